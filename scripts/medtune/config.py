"""Training configuration: one dataclass, parsed from the command line and an optional YAML file.

Precedence: dataclass defaults < --smoke defaults < YAML file (--config) < command-line flags.
Every problem found is collected and reported at once.
"""
import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from medtune.errors import UserError, parse_options

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATASET = "FreedomIntelligence/medical-o1-reasoning-SFT"
SAMPLE_DATASET = "data/medical_reasoning_sample.jsonl"
DEFAULT_SYSTEM_PROMPT_FILE = "prompts/system_prompt.txt"
# The default run's data whatever the batch and the number of processes: 500 steps of 8 sequences on
# one GPU, under an hour for Phi-3 on a T4.
DEFAULT_TRAIN_EXAMPLES = 4_000


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    model: str | None = _f(None, "Hub id or local folder of the base model (default: the preset's Unsloth 4-bit upload).")
    max_seq_length: int = _f(2048, "Longest training sequence in tokens; longer rows are dropped (or cut, see --truncate).")
    load_in_4bit: bool = _f(True, "Load the base model in 4-bit (QLoRA). --no-load-in-4bit loads 16-bit weights.")
    dtype: str = _f("auto", "Compute dtype. auto = bfloat16 where the GPU supports it, else float16 (T4).",
                    choices=("auto", "float16", "bfloat16", "float32"))
    # LoRA
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "LoRA dropout; 0 lets Unsloth use its fast path.")
    target_modules: list[str] | None = _f(
        None, "Comma-separated module names to attach LoRA to (default: every attention and MLP projection; "
              "Phi-3's fused qkv_proj/gate_up_proj are resolved automatically).")
    # data
    dataset: str = _f(DEFAULT_DATASET, "Hub dataset id, or a local .jsonl/.json/.csv/.parquet file.")
    dataset_config: str | None = _f("en", "Hub dataset configuration (ignored for local files).")
    split: str = _f("train", "Hub dataset split to train on (ignored for local files).")
    max_samples: int | None = _f(None, "Use only the first N rows (after a seeded shuffle), for quick runs.")
    eval_samples: int | None = _f(None, "Rows held out for eval loss (default 100, capped at 10%% of the data; 0 = no eval).")
    eval_fraction: float | None = _f(None, "Fraction of rows held out for eval loss, instead of --eval-samples.")
    truncate: bool = _f(False, "Cut rows longer than --max-seq-length instead of dropping them.")
    system_prompt_file: str = _f(DEFAULT_SYSTEM_PROMPT_FILE, "File with the system prompt used in every example.")
    # training
    # 8 x 1 rather than the notebooks' 2 x 4: the same 8 sequences per optimizer step, 2.5x the tokens/s
    # on an H200 (larger matmuls), within a T4's 15 GB at 2048 tokens (BENCHMARKS.md).
    batch_size: int = _f(8, "Sequences per device per step (lower it and raise --grad-accum if memory runs out).")
    grad_accum: int = _f(1, "Gradient accumulation steps (effective batch = batch_size x grad_accum).")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    optim: str = _f("adamw_8bit", "Optimizer name as in transformers (adamw_8bit keeps optimizer state small).")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    warmup_steps: int = _f(10, "Linear warm-up steps.")
    lr_scheduler: str = _f("linear", "Learning-rate schedule after warm-up.", choices=("linear", "cosine", "constant"))
    max_steps: int | None = _f(None, f"Optimizer steps to train (default without --epochs: {DEFAULT_TRAIN_EXAMPLES:,} "
                                     "examples / effective batch, rounded up; effective batch = batch_size x "
                                     "grad_accum x processes).")
    epochs: float | None = _f(None, "Train for this many passes over the data instead of --max-steps.")
    logging_steps: int = _f(10, "Log (and print one line) every N steps.")
    eval_steps: int = _f(100, "Compute eval loss every N steps.")
    save_steps: int = _f(100, "Write a resumable trainer checkpoint every N steps.")
    save_total_limit: int = _f(3, "Keep at most N trainer checkpoints.")
    packing: bool = _f(False, "Pack several examples into each sequence (TRL best-fit packing; masks stay per example).")
    gradient_checkpointing: str = _f(
        "auto", "Recompute activations in the backward pass to save memory. auto = none where a step's activations "
                "(batch x --max-seq-length, estimated from the model's shape) fit the GPU's free memory; else none, "
                "with a cap on a micro-batch's tokens where at least 4 rows fit (a micro-batch of more tokens, rare "
                "with rows shorter than the limit, trains in parts of whole rows: the same rows, loss and gradient); "
                "else unsloth (Unsloth's checkpointing, activations offloaded to the CPU; what a 15 GB T4 needs); "
                "true = plain recomputation; false = none.",
        choices=("auto", "unsloth", "true", "false"))
    dequantize_once: str = _f(
        "auto", "Keep 16-bit copies of the frozen 4-bit weights, dequantized once at load: the same values the 4-bit "
                "layers dequantize at every use, without that work in each forward and backward, at 4x the weights' "
                "memory. auto = where the GPU also keeps every activation (see --gradient-checkpointing) and has room "
                "for both; true = always; false = never.", choices=("auto", "true", "false"))
    hang_timeout: int = _f(600, "Seconds without a finished optimizer step (the first one, which compiles, included) "
                                "after which every process stops with an error showing where each one waits.")
    seed: int = _f(3407, "Seed for LoRA init, data split, shuffling and dropout.")
    report_to: str = _f("none", "Where the trainer also logs: none, tensorboard, wandb ...")
    # run
    run_name: str | None = _f(None, "Name of the run folder under --output-dir (default: <family>-medical, or <family>-smoke).")
    output_dir: str = _f("checkpoints", "Folder holding run folders.")
    overwrite: bool = _f(False, "Replace an existing run folder of the same name.")
    resume: bool = _f(False, "Continue the run folder's newest trainer checkpoint, at the same step and data order.")
    verbose: bool = _f(False, "Show third-party warnings and tool output on the screen instead of in the log file the summary names.")
    smoke: bool = _f(False, "Offline quickstart: a tiny random-weight model with the real tokenizer, the bundled sample, a few steps.")


# What --smoke changes, unless the option is given explicitly. The model is built at run time.
SMOKE_DEFAULTS = dict(
    dataset=SAMPLE_DATASET, dataset_config=None, max_seq_length=1024, max_steps=12, eval_samples=8,
    batch_size=2, grad_accum=2, learning_rate=2e-3, warmup_steps=2, logging_steps=1, eval_steps=6,
    save_steps=6,
)
# Options that may differ from the saved config when resuming: they don't change what was trained so far.
RESUMABLE_CHANGES = {"max_steps", "epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                     "report_to", "resume", "overwrite", "gradient_checkpointing", "dequantize_once", "hang_timeout",
                     "verbose"}
NOT_SAVED = {"resume", "overwrite", "verbose"}


def _base_type(tp):
    """int | None -> int, list[str] | None -> list."""
    if isinstance(tp, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def _convert(name, tp, value):
    """Convert a CLI string or YAML value to the field's type; raise ValueError with a reason."""
    base = _base_type(tp)
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        raise ValueError("may not be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got {value!r}")
    if base is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
            raise ValueError(f"must be a comma-separated list of names, got {value!r}")
        return [i.strip() for i in items]
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be a whole number, got {value!r}")
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"must be a whole number, got {value!r}") from None
    if base is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"must be text, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {tp} for {name}")


def _flag(name):
    return "--" + name.replace("_", "-")


def build_parser(prog, description):
    p = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                allow_abbrev=False)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (the same names, with underscores); "
                   "flags given on the command line win.")
    for f in fields(TrainConfig):
        meta = f.metadata
        default = "" if f.default is None else f" (default: {f.default})"
        if _base_type(f.type) is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           help=meta["help"] + default)
        else:
            # choices are checked by validate(), in one line, not by argparse with the whole usage
            one_of = f" One of: {', '.join(meta['choices'])}." if meta.get("choices") else ""
            p.add_argument(_flag(f.name), dest=f.name, metavar=f.name.upper(), help=meta["help"] + one_of + default)
    return p


def _read_yaml(path):
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"The config file {path} does not exist. Pass the path of a YAML file of options, "
                        "for example the config.yaml that every run folder holds.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"The config file {path} is not valid YAML: {e}. Fix the file and run again.") from None
    if not isinstance(data, dict):
        raise UserError(f"The config file {path} must be a mapping of option names to values, "
                        f"got a {type(data).__name__}.")
    return data


def parse_config(argv, family, prog, description):
    """Parse argv (+ YAML) into a validated TrainConfig. Returns (config, names given explicitly)."""
    parser = build_parser(prog, description)
    ns = parse_options(parser, argv)
    given = vars(ns)
    yaml_path = given.pop("config", None)
    types = {f.name: f.type for f in fields(TrainConfig)}
    values, problems = {}, []
    if yaml_path:
        data = _read_yaml(yaml_path)
        unknown = sorted(set(data) - set(types))
        if unknown:
            problems.append(f"{yaml_path} has unknown option(s) {', '.join(unknown)}; valid names are "
                            f"{', '.join(types)}.")
        for k, v in data.items():
            if k in types:
                try:
                    values[k] = _convert(k, types[k], v)
                except ValueError as e:
                    problems.append(f"{k} in {yaml_path} {e}.")
    for k, v in given.items():
        try:
            values[k] = _convert(k, types[k], v)
        except ValueError as e:
            problems.append(f"{_flag(k)} {e}.")
    if problems:
        raise UserError(" ".join(problems))
    smoke = values.get("smoke", False)
    base = {**(SMOKE_DEFAULTS if smoke else {}), "run_name": f"{family}-{'smoke' if smoke else 'medical'}"}
    cfg = TrainConfig(**{**base, **values})
    validate(cfg)
    return cfg, set(values)


def validate(cfg):
    problems = []
    positive = ["max_seq_length", "lora_r", "lora_alpha", "batch_size", "grad_accum", "logging_steps",
                "eval_steps", "save_steps", "save_total_limit", "hang_timeout"]
    for name in positive:
        if getattr(cfg, name) < 1:
            problems.append(f"{_flag(name)} must be at least 1, got {getattr(cfg, name)}.")
    if cfg.max_seq_length < 64 and cfg.max_seq_length >= 1:
        problems.append(f"--max-seq-length {cfg.max_seq_length} is too short for a prompt and an answer; use 512 or more.")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}.")
    if cfg.learning_rate <= 0:
        problems.append(f"--learning-rate must be positive, got {cfg.learning_rate}.")
    if cfg.warmup_steps < 0 or cfg.weight_decay < 0:
        problems.append("--warmup-steps and --weight-decay may not be negative.")
    if cfg.max_steps is not None and cfg.epochs is not None:
        problems.append("Give either --max-steps or --epochs, not both.")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        problems.append(f"--max-steps must be at least 1, got {cfg.max_steps}.")
    if cfg.epochs is not None and cfg.epochs <= 0:
        problems.append(f"--epochs must be positive, got {cfg.epochs}.")
    if cfg.eval_samples is not None and cfg.eval_fraction is not None:
        problems.append("Give either --eval-samples or --eval-fraction, not both.")
    if cfg.eval_samples is not None and cfg.eval_samples < 0:
        problems.append(f"--eval-samples may not be negative, got {cfg.eval_samples}.")
    if cfg.eval_fraction is not None and not 0 < cfg.eval_fraction < 1:
        problems.append(f"--eval-fraction must be between 0 and 1, got {cfg.eval_fraction}.")
    if cfg.max_samples is not None and cfg.max_samples < 2:
        problems.append(f"--max-samples must be at least 2, got {cfg.max_samples}.")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume continues a run folder and --overwrite replaces it: give one of them.")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.run_name or ""):
        problems.append(f"--run-name {cfg.run_name!r} must be a folder name of letters, digits, '.', '_' and '-'.")
    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            problems.append(f"{_flag(f.name)} must be one of {', '.join(choices)}, got {getattr(cfg, f.name)!r}.")
    if problems:
        raise UserError(" ".join(problems))


def effective_batch(cfg, world_size):
    """Sequences per optimizer step: batch_size x grad_accum on each of world_size processes."""
    return cfg.batch_size * cfg.grad_accum * world_size


def default_max_steps(cfg, world_size):
    """Optimizer steps that train on DEFAULT_TRAIN_EXAMPLES examples (rounded up), whatever the batch
    and the number of processes."""
    return math.ceil(DEFAULT_TRAIN_EXAMPLES / effective_batch(cfg, world_size))


def to_dict(cfg):
    """The options that reproduce a run (saved as config.yaml in the run folder)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SAVED}


def default_system_prompt():
    """The repository's system prompt, for a model that brings none of its own (not a run of ours)."""
    return (REPO_ROOT / DEFAULT_SYSTEM_PROMPT_FILE).read_text().strip()


def resolve_path(path):
    """Relative paths are tried from the working directory, then from the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p
