"""What evaluate.py evaluates: a run folder (its LoRA adapter on the base model), an export, or a
Hub id / model folder; how it is loaded for inference (transformers + PEFT, no Unsloth) and how
its prompts are rendered.

A run folder brings its own tokenizer, chat template and system prompt, and its base model for
--compare-base (the same PEFT model with the adapter switched off, so both see identical prompts).
An export (`<run>/export` or `<run>/export/merged`) is the merged model, with the run folder it
sits in. A Hub id or any other model folder must carry a chat template; it is asked with the
project's system prompt (prompts/system_prompt.txt) and has no base to compare with.
"""
import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from medtune.config import default_system_prompt, resolve_path
from medtune.errors import UserError
from medtune.families import FAMILIES
from medtune.runfolder import ADAPTER, CHAT_TEMPLATE, EXPORT, FOR_MODEL, SYSTEM_PROMPT, open_run


@dataclass(frozen=True)
class Source:
    spec: str  # as given on the command line
    kind: str  # "run", "export" or "model"
    weights: str  # folder or Hub id of the model evaluated (a run's: its base, with `adapter` on top)
    adapter: Path | None
    run_dir: Path | None  # the run folder, where there is one: held-out rows, system prompt, base model
    info: dict | None  # the run's run_info.json
    config: dict | None  # the run's config.yaml
    base: str | None  # what --compare-base loads
    default_out: Path

    @cached_property
    def identity(self):
        """What stored results were computed with: resumed results must come from the same model,
        wherever its folder has moved since."""
        if self.run_dir:
            digest = hashlib.sha256()
            with (self.run_dir / ADAPTER).open("rb") as f:
                for block in iter(lambda: f.read(2**20), b""):
                    digest.update(block)
            return f"{'export of ' if self.kind == 'export' else ''}adapter sha256:{digest.hexdigest()[:16]}"
        return str(Path(self.weights).resolve()) if Path(self.weights).is_dir() else self.weights

    @property
    def family(self):
        return FAMILIES[self.info["family"]] if self.info else None


def _run_source(spec, run_dir, kind, weights=None):
    run = open_run(run_dir, FOR_MODEL)
    base = run.base_source()
    if kind == "run":
        return Source(spec, "run", base, run.path, run.path, run.info, run.config, base, run.path / "eval")
    return Source(spec, "export", str(weights), None, run.path, run.info, run.config, base, run.path / EXPORT / "eval")


def _hub_source(spec):
    from huggingface_hub import constants, try_to_load_from_cache

    if spec.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise UserError(f"There is no run folder or model folder at {spec}, and it is not a Hugging Face Hub id "
                        "(owner/name). Pass a run folder written by training (checkpoints/NAME), its export, or a "
                        "Hub id such as microsoft/Phi-3-mini-4k-instruct.")
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        raise UserError(f"There is no folder {spec}, and no Hub model {spec} is in the local cache while the Hub is "
                        "unreachable (HF_HUB_OFFLINE is set). Check the run folder's path, or unset HF_HUB_OFFLINE "
                        "on a machine with network to evaluate a Hub model.")
    return Source(spec, "model", spec, None, None, None, None, None, Path("reports", "eval", spec.replace("/", "--")))


def resolve(spec):
    """The Source that `spec` names; nothing is loaded yet. Errors say what the folder holds instead."""
    path = resolve_path(spec)
    if not path.exists():
        return _hub_source(spec)
    if not path.is_dir():
        raise UserError(f"{spec} is a file. Pass a run folder (checkpoints/NAME), an export folder or a Hub id.")
    if (path / "merged" / "config.json").is_file():
        path = path / "merged"
    if (path / "config.json").is_file():
        run = path.parent.parent if path.parent.name == "export" else None
        if run is not None and (run / "run_info.json").is_file():
            return _run_source(spec, run, "export", path)
        return Source(spec, "model", str(path), None, None, None, None, None, Path("reports", "eval", path.name))
    if any((path / f).exists() for f in ("run_info.json", "adapter_config.json", "config.yaml")) \
            or any(path.glob("checkpoint-*")):
        return _run_source(spec, path, "run")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
    raise UserError(f"{spec} holds neither a run nor a model (found: {found}). Pass a run folder written by training "
                    "(it holds adapter_model.safetensors and run_info.json), its export/ folder, or a model folder "
                    "with config.json.")


def load_tokenizer(source, chat=True):
    """The tokenizer with the chat template the model was trained with; an error when it has none
    and `chat` prompts are to be rendered."""
    from transformers import AutoTokenizer

    where = source.run_dir if source.kind == "run" else source.weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise UserError(f"Can't load the tokenizer of {source.spec} ({e}). Check the id or folder and the "
                        "network.") from None
    if source.kind == "run":
        tokenizer.chat_template = (source.run_dir / CHAT_TEMPLATE).read_text()
    if chat and not tokenizer.chat_template:
        raise UserError(f"{source.spec} has no chat template, so its prompts can't be rendered as the model expects. "
                        "Evaluate the run folder it came from, or add a chat_template.jinja (or the chat_template key "
                        "in tokenizer_config.json) to the model folder.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # pads are masked everywhere
    return tokenizer


def system_prompt(source):
    return (source.run_dir / SYSTEM_PROMPT).read_text().strip() if source.run_dir else default_system_prompt()


def prompt_text(tokenizer, system, user, answer_prefix=None):
    """The prompt text up to the assistant turn, or into it up to `answer_prefix` (loglik mode).

    A template that refuses a system turn (Mistral's own on the Hub) gets the system prompt folded
    into the user turn, as our Mistral template does itself."""
    from jinja2 import TemplateError

    def apply(messages):
        if answer_prefix is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answered = [*messages, {"role": "assistant", "content": answer_prefix}]
        full = tokenizer.apply_chat_template(answered, tokenize=False)
        return full[: full.rindex(answer_prefix) + len(answer_prefix)]  # cut the end-of-turn markup

    try:
        return apply([{"role": "system", "content": system}, {"role": "user", "content": user}])
    except TemplateError:
        return apply([{"role": "user", "content": f"{system}\n\n{user}"}])


def _device_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


SIXTEEN_BIT_SHARE = 0.6  # of the GPU memory: a 16-bit copy larger than this leaves too little for the cache


def load_weights(name, sixteen_bit=False):
    """The model, on the GPU where there is one. With `sixteen_bit`, 4-bit weights are unpacked to
    16 bits where that copy fits: the same numbers bitsandbytes unpacks at every step, once."""
    from transformers import AutoModelForCausalLM

    device, dtype = _device_dtype()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map={"": device}).eval()
    except OSError as e:
        raise UserError(f"Can't load the model {name} ({e}). Check the id or folder and the network.") from None
    if sixteen_bit and getattr(model, "hf_quantizer", None) is not None and _fits(model, dtype):
        model = model.dequantize(dtype=dtype).eval()
    return model


def _fits(model, dtype):
    import torch

    if not torch.cuda.is_available():
        return True
    from medtune.evaluation.generation import memory_budget

    extra = model.num_parameters() * dtype.itemsize - model.get_memory_footprint()
    return extra <= SIXTEEN_BIT_SHARE * (memory_budget() + model.get_memory_footprint())


def weights_of(model):
    """How the model's linear weights are held, for summary.json: 4-bit or the 16/32-bit dtype."""
    quantizer = getattr(getattr(model, "get_base_model", lambda: model)(), "hf_quantizer", None)
    return "4-bit" if quantizer is not None else str(model.dtype).removeprefix("torch.")


def models(source, compare_base, fast=False):
    """(role, model) pairs, one model in memory at a time: "finetuned" then "base" for a run or an
    export, "model" for anything else. Consume it fully: a run's base is its adapter switched off.

    `fast` unpacks 4-bit weights to 16 bits where they fit. The adapter stays unmerged: adding it
    into 16-bit weights would round its small deltas away (and gained 11% on an H200, BENCHMARKS.md)."""
    if source.kind == "run":
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_weights(source.weights, fast), source.adapter).eval()
        yield "finetuned", model
        if compare_base:
            with model.disable_adapter():
                yield "base", model
        return
    model = load_weights(source.weights, fast)
    yield ("finetuned" if source.kind == "export" else "model"), model
    if compare_base:
        del model
        yield "base", load_weights(source.base, fast)


def stop_ids(model, tokenizer, source):
    """Token ids that end an answer: EOS, the family's end-of-turn token, the model's own EOS ids."""
    ids = set(source.family.stop_ids(tokenizer)) if source.family else {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def describe(source):
    """What summary.json records about the model evaluated."""
    return {"source": source.spec, "kind": source.kind, "identity": source.identity, "weights": source.weights,
            "adapter": str(source.adapter) if source.adapter else None, "base_model": source.base,
            "family": source.info["family"] if source.info else None,
            "run": str(source.run_dir) if source.run_dir else None,
            "smoke": bool(source.config and source.config.get("smoke"))}
