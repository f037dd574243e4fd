"""Merge a run's LoRA adapter into the 16-bit base, one tensor at a time.

Streaming keeps memory to one shard: a 7B merge fits Colab's 12 GB of RAM. A bitsandbytes 4-bit
base (Unsloth's -bnb-4bit uploads) is dequantized tensor by tensor first; LoRA is never merged
into 4-bit weights.
"""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medtune.config import resolve_path
from medtune.errors import UserError

# Companions of a bitsandbytes 4-bit weight in a saved checkpoint: "<name>.weight.absmax" etc.
BNB_SUFFIX = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$")
ADAPTER_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
# Embedding rows trained in full (untrained turn tokens of a base model): the new rows, in the order of
# adapter_config.json's trainable_token_indices.
TOKEN_KEY = re.compile(r"^base_model\.model\.(.+)\.token_adapter\.trainable_tokens_delta$")


def base_files(source):
    """Local folder holding the base model's config and safetensors (downloaded once from the Hub)."""
    path = resolve_path(source)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
        except Exception as e:  # offline, unknown repo, gated: all mean "no base to merge into"
            raise UserError(f"Can't get the base model {source} to merge into ({type(e).__name__}: {e}). Connect to "
                            "the Hugging Face Hub or put the base model's folder at that path.") from None
    shards = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not shards:
        raise UserError(f"The base model folder {path} has no config.json and safetensors weights to merge into.")
    return path, shards


def read_adapter(run_dir):
    config = json.loads((run_dir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("peft_type") != "LORA":
        raise UserError(f"{run_dir} holds a {config.get('peft_type')} adapter{' with DoRA' if config.get('use_dora') else ''}; "
                        "export merges plain LoRA adapters only.")
    r = config["r"]
    scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
    pairs = {}
    with safe_open(run_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():
            m = ADAPTER_KEY.match(key)
            rows = TOKEN_KEY.match(key)
            if rows:
                pairs[rows.group(1) + ".weight"] = {"rows": f.get_tensor(key), "ids": _token_ids(config, key)}
                continue
            if not m:
                raise UserError(f"Unexpected tensor {key} in {run_dir / 'adapter_model.safetensors'}: not a LoRA A/B "
                                "weight. Export merges adapters written by this tool's training.")
            pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = f.get_tensor(key)
    return pairs, scale


def _token_ids(config, key):
    ids = config.get("trainable_token_indices")
    if isinstance(ids, dict):
        ids = next((v for k, v in ids.items() if f".{k}.token_adapter" in key), None)
    if not ids:
        raise UserError(f"The adapter holds trained embedding rows ({key}) but adapter_config.json names no "
                        "trainable_token_indices. Export adapters written by this tool's training.")
    return ids


def _apply(key, w, change, scale, source):
    """The base weight with the adapter's change: trained embedding rows put in place, or the LoRA
    product added."""
    if "rows" in change:
        w = w.clone()
        w[torch.tensor(change["ids"])] = change["rows"].to(w.dtype)
        return w
    a, b = change["A"].float(), change["B"].float()
    if (b.shape[0], a.shape[1]) != tuple(w.shape):
        raise UserError(f"The adapter does not match the base model {source}: its LoRA for {key} is "
                        f"{b.shape[0]}x{a.shape[1]} but the base weight is {tuple(w.shape)[0]}x"
                        f"{tuple(w.shape)[1]}. Export the run with the base it was trained on "
                        "(run_info.json names it).")
    return w.float() + scale * (b @ a)


def _quant_state(name, tensors, f):
    """The bitsandbytes QuantState of a packed 4-bit weight, from its companion tensors."""
    from bitsandbytes.functional import QuantState

    state = {k[len(name) + 1:]: f.get_tensor(k) for k in tensors if k.startswith(name + ".") and BNB_SUFFIX.search(k)}
    return QuantState.from_dict(state, device=torch.device("cpu")) if state else None


def merge(run_dir, source, out_dir, dtype, progress=print):
    """Write the merged model's safetensors and config.json to out_dir; return the parameter count."""
    from bitsandbytes.functional import dequantize_4bit

    base_dir, shards = base_files(source)
    pairs, scale = read_adapter(run_dir)
    used, total, index = set(), 0, {}
    for n, shard in enumerate(shards, 1):
        out = {}
        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
            for key in keys:
                if BNB_SUFFIX.search(key):
                    continue
                w = f.get_tensor(key)
                state = _quant_state(key, keys, f) if w.dtype == torch.uint8 else None
                if state is not None:
                    w = dequantize_4bit(w, state)
                if key in pairs:
                    w = _apply(key, w, pairs[key], scale, source)
                    used.add(key)
                out[key] = w.to(dtype) if w.is_floating_point() else w
                total += w.numel()
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(out, out_dir / name, metadata={"format": "pt"})
        index.update({k: name for k in out})
        progress(f"  merged shard {n}/{len(shards)} ({sum(t.numel() for t in out.values()) / 1e6:,.0f}M parameters)")
    missing = sorted(set(pairs) - used)
    if missing:
        raise UserError(f"The adapter does not match the base model {source}: {len(missing)} of its LoRA weights "
                        f"have no base weight, e.g. {missing[0]}. Export the run with the base it was trained on.")
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total * dtype.itemsize}, "weight_map": index}, indent=2))
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)  # the merged weights are plain 16-bit
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return total, base_dir


def copy_tokenizer(run_dir, out_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / name)
