"""--resume: the run folder's newest trainer checkpoint, the config and the number of processes it
was trained with; and the checks on the run folder's path that come before anything is loaded."""
import yaml

from medtune import distributed
from medtune.config import RESUMABLE_CHANGES, TrainConfig, effective_batch
from medtune.errors import UserError


def check_run_dir_path(run_dir):
    """A file where the run folder or one of its parents should be would fail only after the model
    has loaded (minutes on a real run), when the folder is made."""
    blocked = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(f"The run folder {run_dir} can't be made: {blocked} is a file, not a folder. Point "
                        "--output-dir at a folder (it is made if missing), or choose another --run-name.")


def newest_checkpoint(run_dir):
    found = [p for p in run_dir.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def resume_config(run_dir, cfg, given):
    """The saved config of the run, with the few options that may change on resume taken from cfg."""
    saved_path = run_dir / "config.yaml"
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
