"""Model: find it, load it in 4-bit with Unsloth, attach LoRA to the real projection layers.

Unsloth must be imported before transformers, TRL and PEFT so that its patches apply: callers
import this module first.
"""
import os
import shutil
import warnings
from pathlib import Path

import unsloth  # noqa: F401  (patches transformers/TRL/PEFT on import)
import torch
from unsloth import FastLanguageModel, FastModel

from medtune import distributed
from medtune.config import resolve_path
from medtune.errors import UserError
from medtune.fileio import atomic_dir
from medtune.families import linear_names, resolve_lora_targets
from medtune.offline_tokenizers import cache_dir, tokenizer_dir
from medtune.train import lora_add


def resolve_dtype(requested):
    """(torch dtype for Unsloth or None for its own choice, warning or None). A T4 never gets bf16."""
    if not torch.cuda.is_available():
        return (None if requested == "auto" else getattr(torch, requested)), None
    bf16_ok = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return (torch.bfloat16 if bf16_ok else torch.float16), None
    if requested == "bfloat16" and not bf16_ok:
        name = torch.cuda.get_device_name()
        return torch.float16, f"{name} does not support bfloat16: training in float16 instead."
    return getattr(torch, requested), None


def check_model_source(name):
    """The local folder or Hub id to load; a clear error when there is nothing to load there."""
    path = resolve_path(name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) if path.is_dir() else "a file"
            raise UserError(f"{name} holds no model: a model folder needs config.json and weights, and "
                            f"{'this one has ' + found if found != 'a file' else 'this is a file'}. Pass the folder a model "
                            "was saved to (save_pretrained) or a Hugging Face Hub id.")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"There is no model folder at {name}, and it is not a Hugging Face Hub id "
                        "(owner/name). Check the path, or pass a Hub id such as unsloth/Phi-3-mini-4k-instruct-bnb-4bit.")
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return name
        raise UserError(f"The model {name} is not in the local cache and the Hugging Face Hub is unreachable "
                        "(HF_HUB_OFFLINE is set). Unset HF_HUB_OFFLINE on a machine with network, or download the "
                        "model elsewhere and pass its folder with --model PATH, or run the offline quickstart with --smoke.")
    try:
        model_info(name)
    except GatedRepoError:
        raise UserError(f"The model {name} is gated: accept its license on its Hub page and log in with "
                        "`huggingface-cli login` (or set HF_TOKEN), then run again.") from None
    except RepositoryNotFoundError:
        raise UserError(f"No model {name} exists on the Hugging Face Hub (or it is private). Check the id, e.g. "
                        "unsloth/Phi-3-mini-4k-instruct-bnb-4bit, or pass a local folder with --model.") from None
    except OSError as e:  # connection errors
        raise UserError(f"Can't reach the Hugging Face Hub to find the model {name} ({type(e).__name__}). Check the "
                        "network, or pass a local folder with --model PATH, or run the offline quickstart with --smoke.") from None
    return name


def tiny_model_path(family):
    """Where tiny_model_dir keeps the family's 2-layer stand-in (built or not)."""
    return cache_dir() / "tiny" / family.name


def tiny_model_dir(family):
    """A 2-layer random-weight model of the family with its real tokenizer, built once in the cache."""
    out = tiny_model_path(family)
    with distributed.local_main_first():  # under torchrun one process builds it, the others find it built
        if not (out / "config.json").is_file():
            build_random_model(family, out, family.tiny_config)
    return out


def build_random_model(family, out, sizes, device="cpu", dtype=torch.float32):
    """Save a random-weight model of the family's architecture (seeded) with its real tokenizer to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = tokenizer_dir(family.name)
    tokenizer = AutoTokenizer.from_pretrained(src)
    config = AutoConfig.for_model(family.model_type, **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    stop_ids = family.stop_ids(tokenizer, eos_id=config.eos_token_id)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=stop_ids)
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        for f in src.iterdir():
            shutil.copy2(f, tmp / f.name)
    return out


# As FastLanguageModel passes them when it hands a model to FastModel (unsloth/models/loader.py).
FAST_MODEL_OPTIONS = dict(fullgraph=True, return_logits=False) if torch.cuda.is_available() else {}


def load_model(source, cfg):
    """(model, tokenizer) through Unsloth's FastModel, and a dtype warning or None.

    FastModel keeps transformers' modeling code and compiles each decoder block, with Unsloth's
    packed varlen attention for padding-free batches: what FastLanguageModel itself picks for Phi-3
    and Gemma 3. For Mistral FastLanguageModel would swap in Unsloth's hand-written forwards, which
    run every block eagerly and attend segment by segment on packed rows (BENCHMARKS.md). On a CPU
    Unsloth's FastModel is FastLanguageModel."""
    dtype, warning = resolve_dtype(cfg.dtype)
    placement = {}
    if torch.cuda.is_available() and distributed.world_size() > 1:
        # Data-parallel: a whole 4-bit copy on each process's own GPU (4-bit weights can't be moved
        # after loading). Unsloth 2026.10 picks this itself under torchrun; named, it does not depend on that.
        placement = dict(device_map={"": distributed.local_rank()})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
        model, tokenizer = FastModel.from_pretrained(
            model_name=source, max_seq_length=cfg.max_seq_length, dtype=dtype, load_in_4bit=cfg.load_in_4bit,
            token=os.environ.get("HF_TOKEN"), **placement, **FAST_MODEL_OPTIONS,
        )
    return model, tokenizer, warning


def free_gpu_bytes():
    """Bytes this process may still take on its GPU (None without one): what the device has free, and
    no more than a cap set with torch.cuda.set_per_process_memory_fraction leaves."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 1.0)(index)
    capped = fraction * total - torch.cuda.memory_reserved(index)
    return int(min(free, capped))


def choose_checkpointing(model, cfg):
    """(choice "unsloth" / "true" / "false", the line that says why, the token cap of a micro-batch or
    None) for --gradient-checkpointing (medtune.train.memory.plan_checkpointing), from the smallest free
    memory of any rank, leaving room for the 16-bit weight copies where --dequantize-once may make them."""
    from medtune.train.dequantize import copy_bytes
    from medtune.train.memory import activation_bytes, plan_checkpointing

    reserve = copy_bytes(model) if cfg.dequantize_once != "false" else 0
    return plan_checkpointing(cfg.gradient_checkpointing, activation_bytes(model.config, 1), cfg.max_seq_length,
                              cfg.batch_size, distributed.smallest(free_gpu_bytes()), reserve)


UNSLOTH_CHECKPOINTING = {"unsloth": "unsloth", "true": True, "false": False}


UNTRAINED_COSINE = 0.99  # a row this close to UNTRAINED_TWINS others was never moved by pretraining
UNTRAINED_TWINS = 8


def untrained_turn_tokens(model, tokenizer):
    """Ids of the chat template's special tokens (those in a rendered conversation) whose embedding
    was never trained: a near copy of at least UNTRAINED_TWINS other rows, as a base model's
    reserved tokens are. LoRA on the linear layers can barely lift such a token's score above its
    copies' (Gemma-3-270M base: <end_of_turn> at cosine 0.995 to about a thousand <unused> tokens,
    and the output layer is the embeddings), so the fine-tuned model rarely ends its turn. Instruct
    models' turn tokens are trained: none is found."""
    from medtune.train.data import Example, conversation_texts

    text = conversation_texts(tokenizer, Example("Q?", "R.", "A."), "S.")[1]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = sorted({i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in special})
    weight = model.get_input_embeddings().weight.detach()
    norms = weight.float().norm(dim=1).clamp_min(1e-12)
    found = []
    for i in ids:
        cosine = (weight @ weight[i]).float() / (norms * norms[i])
        if int((cosine > UNTRAINED_COSINE).sum()) - 1 >= UNTRAINED_TWINS:
            found.append(i)
    return found


def trainable_tokens(model, tokenizer, say=print):
    """get_peft_model's extra arguments: where the turn tokens look untrained (a base model) and the
    output layer is the embeddings (tied), their rows are trained with the adapter, so the output
    rows move too; untied, a warning. Measured on Gemma-3-270M base, 48 steps: stops at
    <end_of_turn> on 7/8 held-out questions with the row trained (6/8 through the q8_0 export),
    0/8 without (README)."""
    found = untrained_turn_tokens(model, tokenizer)
    if not found:
        return {}
    names = ", ".join(tokenizer.convert_ids_to_tokens(found))
    if not model.config.get_text_config().tie_word_embeddings:
        say(f"Warning: this model's {names} embedding looks untrained (a base model?) and its output layer is not "
            "the embeddings, so LoRA can barely raise its score and the fine-tuned model may never end its turn. "
            "Fine-tune the instruct version of the model, as the presets do.")
        return {}
    say(f"This model's {names} embedding looks untrained (a base model): a near copy of many reserved tokens'. "
        "Its row of the embeddings, which are also the output layer, is trained with the adapter, so the model can "
        "learn to end its turn (each step computes the output layer's full gradient: slower).")
    return {"trainable_token_indices": found}


def expose_trained_rows(model):
    """Make the rows of PEFT's trainable tokens train, on every path:
    - on a GPU, Unsloth's loader freezes every parameter not named lora_* after PEFT has attached
      (unsloth_zoo's prepare_model_for_training), the trained rows included: found on an H200, where
      they stayed at their initial value; they are unfrozen again here;
    - TRL's fused LM head and Unsloth's fused loss multiply by `lm_head.weight` directly, while PEFT's
      wrapper applies its trained rows only in its own forward: the output layer's wrapper gets a
      `weight` that is the base weight with the trained rows in place (differentiable in them) and
      its base layer's `bias`, so the loss trains the output rows too."""
    for name, param in model.named_parameters():
        if ".token_adapter.trainable_tokens_delta." in name:
            param.requires_grad_(True)
    head = model.get_output_embeddings()
    if getattr(head, "token_adapter", None) is None:
        return
    cls = type(head)
    head.__class__ = type(cls.__name__, (cls,), {
        "weight": property(lambda self: self.token_adapter.get_merged_weights(self.token_adapter.active_adapters)),
        "bias": property(lambda self: getattr(self.token_adapter.base_layer, "bias", None)),
    })


def attach_lora(model, cfg, family, checkpointing="unsloth", tokenizer=None, say=print):
    """LoRA on every requested projection that exists; an error listing the real names otherwise.
    checkpointing: a choice of choose_checkpointing. With the tokenizer, untrained turn tokens are
    trained too (trainable_tokens)."""
    requested = cfg.target_modules or list(family.lora_targets)
    available = linear_names(model)
    targets, missing = resolve_lora_targets(requested, available)
    if missing or not targets:
        raise UserError(f"LoRA target module(s) {', '.join(missing or requested)} do not exist in this model. "
                        f"Its linear layers are: {', '.join(available)}. Pass some of those with --target-modules.")
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        bias="none", use_gradient_checkpointing=UNSLOTH_CHECKPOINTING[checkpointing], random_state=cfg.seed,
        **(trainable_tokens(model, tokenizer, say) if tokenizer is not None else {}),
    )
    expose_trained_rows(model)
    attached = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    layers = model.config.num_hidden_layers
    assert attached == layers * len(targets), f"LoRA attached to {attached} modules, expected {layers} x {targets}"
    settle_varlen_probe(model)
    lora_add.add_in_compiled_kernels(model)
    return model, targets


def settle_varlen_probe(model):
    """Run Unsloth's varlen-attention probe now, eagerly, once per process and before any DDP wrapper,
    for every (dtype, window) a decoder block can ask it about; {key: answer}, {} where it does not apply.

    Unsloth asks the probe while Dynamo traces the first compiled decoder block of the padding-free
    path, and the probe runs a real forward and backward there. Under torchrun both ranks of a 2 x H200
    run stopped for good inside that backward (issue 13): a backward started inside a traced forward of
    a DDP-wrapped model. Its answer is cached per process by exactly these arguments, so asked here
    first, the traced call reads the cache and runs no backward."""
    try:
        from unsloth.utils import hf_packed_attention as packed
    except ImportError:
        return {}
    probe = getattr(packed, "_varlen_in_graph_eager", None)
    if probe is None or not torch.cuda.is_available():
        return {}
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # The block passes the config's sliding window, or None; ask both.
    windows = {None}
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and not isinstance(window, bool) and window > 0:
        windows.add(window)
    device = torch.cuda.current_device()
    # Both 16-bit types: which one the blocks run in is Unsloth's choice, and a probe costs milliseconds.
    return {(device, dtype, head_dim, heads, kv_heads, w): probe(device, dtype, head_dim, heads, kv_heads, w)
            for dtype in (torch.bfloat16, torch.float16) for w in windows}


def copy_tokenizer_model(source, dest: Path):
    """transformers 5 does not write the SentencePiece tokenizer.model on save; llama.cpp's converter
    needs it, so copy it from the base model when it has one."""
    path = resolve_path(source)
    if path.is_dir():
        found = path / "tokenizer.model"
        found = str(found) if found.is_file() else None
    else:
        from huggingface_hub import hf_hub_download

        try:
            found = hf_hub_download(source, "tokenizer.model")
        except Exception:  # the base has no tokenizer.model (a pure tokenizer.json model) or the Hub is away
            found = None
    if found:
        shutil.copy2(found, dest / "tokenizer.model")
    return found is not None
