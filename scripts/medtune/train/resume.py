"""--resume: the run folder's newest trainer checkpoint, the config and the number of processes it
was trained with; and the checks on the run folder's path that come before anything is loaded."""
import json

import yaml

from medtune import distributed
from medtune.config import RESUMABLE_CHANGES, TrainConfig, effective_batch
from medtune.errors import UserError
from medtune.runfolder import CONFIG, checkpoints


def check_run_dir_path(run_dir):
    """A file where the run folder or one of its parents should be would fail only after the model
    has loaded (minutes on a real run), when the folder is made."""
    blocked = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(f"The run folder {run_dir} can't be made: {blocked} is a file, not a folder. Point "
                        "--output-dir at a folder (it is made if missing), or choose another --run-name.")


def newest_checkpoint(run_dir):
    found = [p for p in checkpoints(run_dir)
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def resume_config(run_dir, cfg, given):
    """The saved config of the run, with the few options that may change on resume taken from cfg."""
    saved_path = run_dir / CONFIG
    if not saved_path.is_file():
        raise UserError(f"{run_dir} has no config.yaml, so it is not a run folder this tool wrote and can't be "
                        "resumed. Start a new run with another --run-name, or replace it with --overwrite.")
    saved = yaml.safe_load(saved_path.read_text())
    changed = sorted(k for k in given if k in saved and k not in RESUMABLE_CHANGES | {"run_name", "output_dir"}
                     and getattr(cfg, k) != saved[k])
    if changed:
        raise UserError(f"--resume continues the run exactly as it was configured, but these options differ from "
                        f"its config.yaml: {', '.join(changed)}. Drop them (only {', '.join(sorted(RESUMABLE_CHANGES - {'resume', 'overwrite'}))} "
                        "may change), or start a new run with another --run-name.")
    merged = {**saved, "resume": True}
    for k in given & RESUMABLE_CHANGES:
        merged[k] = getattr(cfg, k)
    if "max_steps" in given:
        merged["epochs"] = None
    elif "epochs" in given:
        merged["max_steps"] = None
    return TrainConfig(**merged)


def checkpoint_world_size(checkpoint):
    """How many processes trained up to the checkpoint: the trainer keeps one random state per rank
    (rng_state_<rank>.pth), or a single rng_state.pth for one process."""
    return len(list(checkpoint.glob("rng_state_*.pth"))) or 1


def check_world_size(checkpoint, cfg, script):
    """Refuse to resume with another number of processes. The trainer finds its place in the data by
    counting the batches of the new sharding, so rows would be repeated or skipped; the per-rank random
    states would not match; and the effective batch, what one step means, would change."""
    trained, now = checkpoint_world_size(checkpoint), distributed.world_size()
    if trained == now:
        return

    def launch(n):
        return f"python {script}" if n == 1 else f"torchrun --nproc_per_node {n} {script}"

    raise UserError(f"--resume: {checkpoint} was trained by {trained} process{'es' * (trained > 1)} (effective batch "
                    f"{effective_batch(cfg, trained)} = {cfg.batch_size} x {cfg.grad_accum} x {trained}), but this launch "
                    f"has {now}. A run continues only with the number of processes it was trained with: with another, "
                    "the effective batch and the rows each step sees would change. Launch it again as "
                    f"`{launch(trained)} ... --resume`, or start a new run with another --run-name.")


def nothing_left(run_dir, checkpoint, cfg):
    """The message for a --resume of a run that has trained all its steps, else None. Resuming it
    would train one step past the end at learning rate 0 and rewrite the adapter under its export."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step = state["global_step"]
    done = step >= cfg.max_steps if cfg.max_steps else state.get("epoch", 0) >= cfg.epochs - 1e-4
    if not done:
        return None
    if not (run_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"--resume: {checkpoint} is the run's last step ({step}), but the run stopped before writing "
                        f"its final files. Its adapter is {checkpoint / 'adapter_model.safetensors'}; to train on, pass "
                        "a larger --max-steps with --resume.")
    goal = f"step {step} of {cfg.max_steps}" if cfg.max_steps else f"epoch {cfg.epochs:g}"
    return (f"--resume: {run_dir} is already finished ({checkpoint.name} is {goal}); nothing was trained and "
            f"nothing changed. To train it further, add a larger --max-steps, e.g. --resume --max-steps {step * 2}.")


def whole_run_loss_mean(records, session_mean, global_step, checkpoint):
    """Mean training loss over every step of the run, resumed from `checkpoint` or not (None). The
    trainer's own figure divides the loss of this session's steps by all the steps; the earlier
    sessions' steps are in metrics.jsonl, each logged loss the mean of the steps since the previous log."""
    if checkpoint is None:
        return session_mean
    resumed_step, before, last = int(checkpoint.name.split("-")[-1]), 0.0, 0
    for r in records:
        if "loss" in r and r["step"] <= resumed_step:
            before += r["loss"] * (r["step"] - last)
            last = r["step"]
    return (before + session_mean * global_step) / (last + global_step - resumed_step)


def match_adapter_dtype(run_dir, checkpoint):
    """Write the resumed run's adapter in the dtype of its checkpoints, which is the dtype an
    uninterrupted run writes (bfloat16 on a 16-bit base). After a resume the LoRA weights the trainer
    loaded back from the checkpoint (PEFT's load_adapter upcasts 16-bit adapters) are float32, and
    the adapter would be saved so."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    path = run_dir / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    want = {k: getattr(torch, _TORCH_DTYPES[d]) for k, d in dtypes.items() if d in _TORCH_DTYPES}
    weights = load_file(path)
    if all(w.dtype == want.get(k, w.dtype) for k, w in weights.items()):
        return
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: w.to(want.get(k, w.dtype)) for k, w in weights.items()}, tmp, metadata=metadata)
    tmp.rename(path)


_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # safetensors' names -> torch's
