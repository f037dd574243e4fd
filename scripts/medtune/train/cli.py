"""Fine-tune a model family for medical step-by-step reasoning: Unsloth 4-bit model + LoRA, TRL
SFTTrainer, loss on the assistant turn only. The command behind scripts/train_phi.py
and scripts/train_mistral.py, which write checkpoints/<run-name>/ (medtune/runfolder.py).

    python scripts/train_phi.py --smoke     # offline quickstart: tiny model, bundled sample, CPU
    python scripts/train_phi.py             # the real run: Phi-3-mini on medical-o1-reasoning-SFT
    torchrun --nproc_per_node 2 scripts/train_phi.py   # the same, data-parallel on 2 GPUs

Under torchrun or accelerate launch every process trains on its own share of the data and only rank 0
prints and writes the run folder (see medtune/distributed.py).
"""
import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from medtune import distributed, noise, runfolder
from medtune.config import default_max_steps, effective_batch, parse_config, to_dict
from medtune.errors import UserError, report_user_errors
from medtune.families import FAMILIES
from medtune.fileio import read_jsonl
from medtune.train import lora_add
from medtune.train.resume import (check_run_dir_path, check_world_size, match_adapter_dtype, newest_checkpoint,
                                  nothing_left, resume_config, whole_run_loss_mean)
from medtune.train.trainer import build_trainer, describe_device, out_of_memory_message, read_system_prompt, versions


def say(*args, **kwargs):
    """print, on rank 0 only: one line per event, not one per process."""
    if distributed.is_main():
        print(*args, flush=True, **kwargs)


@dataclass
class Prepared:
    """A run ready to train: the resolved config, the model with LoRA attached, the tokenized data."""
    cfg: object
    model: object
    tokenizer: object
    targets: list
    system_prompt: str
    train_rows: list
    eval_rows: list
    eval_examples: list
    data_stats: dict
    checkpointing: str  # the --gradient-checkpointing choice: unsloth, true or false
    dequantized: bool = False  # the --dequantize-once choice
    cap: int = None  # auto's most tokens per micro-batch (longer ones train in parts of whole rows), None: no cap


def run(family_name, argv=None, callbacks=()):
    family = FAMILIES[family_name]
    script = family.preset
    cfg, given = parse_config(sys.argv[1:] if argv is None else argv, family_name, script,
                              f"Fine-tune {family.title} for medical step-by-step reasoning (Unsloth 4-bit LoRA + TRL).")
    run_dir = Path(cfg.output_dir).expanduser() / cfg.run_name
    noise.divert("train" if distributed.is_main() else f"train-rank{distributed.rank()}", cfg.verbose)
    check_run_dir_path(run_dir)
    lora_add.choice()
    cfg, checkpoint = check_run_dir(run_dir, cfg, given, script)
    if checkpoint and (done := nothing_left(run_dir, checkpoint, cfg)):
        say(done)
        return run_dir
    if cfg.max_steps is None and cfg.epochs is None:
        cfg = dataclasses.replace(cfg, max_steps=default_max_steps(cfg, distributed.world_size()))
    prepared = prepare(family, cfg)

    # From here on rank 0 writes the run folder: only after every rank has looked at it above, and
    # before any rank trains (the others write their random state into its checkpoints).
    fresh = checkpoint is None
    distributed.barrier()
    if fresh and distributed.is_main():
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    distributed.barrier()
    from medtune.train.watchdog import failed_run_cleanup, watchdog_callback

    clean_up = failed_run_cleanup(run_dir, fresh)
    watchdog = watchdog_callback(cfg.hang_timeout, clean_up)
    try:
        return train(family, prepared, run_dir, checkpoint, [watchdog, *callbacks])
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):  # Ctrl-C reaches every rank by itself
            watchdog.dog.follow_others()
        watchdog.dog.stop()
        where = clean_up()
        import torch

        if not isinstance(e, KeyboardInterrupt):
            distributed.tell_others_stopped("out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__)
        if isinstance(e, torch.OutOfMemoryError):
            raise UserError(out_of_memory_message(prepared.cfg) + " " + where, rank_specific=True) from None
        if isinstance(e, KeyboardInterrupt):
            say(f"\nTraining interrupted. {where}", file=sys.stderr)
        raise


def check_run_dir(run_dir, cfg, given, script):
    """(config, checkpoint to resume or None): --resume needs a run folder with a checkpoint, a new run a free name."""
    if not cfg.resume:
        if run_dir.exists() and not cfg.overwrite:
            raise UserError(f"The run folder {run_dir} already exists. Add --resume to continue it, --overwrite to "
                            "replace it, or choose another --run-name.")
        return cfg, None
    if not run_dir.is_dir():
        raise UserError(f"--resume: there is no run folder {run_dir} to continue. Check --run-name and "
                        "--output-dir, or start the run without --resume.")
    cfg = resume_config(run_dir, cfg, given)
    checkpoint = newest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"--resume: {run_dir} holds no trainer checkpoint (checkpoint-N folders are written every "
                        f"--save-steps {cfg.save_steps} steps). Start again with --overwrite.")
    check_world_size(checkpoint, cfg, script)
    return cfg, checkpoint


def prepare(family, cfg):
    """Everything that can be checked is checked before anything is written. Every rank checks the
    same arguments and files, so a mistake stops every rank here, before they wait for each other."""
    from medtune.train.data import load_rows, split_examples, to_examples, tokenize_examples

    system_prompt = read_system_prompt(cfg)
    say(f"Loading data from {cfg.dataset} ...")
    examples = to_examples(load_rows(cfg), cfg.dataset)
    distributed.start()
    from medtune.train import dequantize, modeling  # imports Unsloth (slow), after the cheap checks
    from medtune.train.reporting import describe_data

    if cfg.smoke and not cfg.model:
        cfg = dataclasses.replace(cfg, model=str(modeling.tiny_model_dir(family)))
    source = modeling.check_model_source(cfg.model or family.default_model)
    cfg = dataclasses.replace(cfg, model=source)
    say(f"Loading {source} (4-bit: {cfg.load_in_4bit}) ...")
    model, tokenizer, dtype_warning = modeling.load_model(source, cfg)
    if dtype_warning:
        print(f"warning: {dtype_warning}", file=sys.stderr)
    family.prepare_tokenizer(tokenizer)
    train_ex, eval_ex = split_examples(examples, cfg)
    train_rows, train_stats = tokenize_examples(train_ex, tokenizer, family, cfg, system_prompt)
    eval_rows, eval_stats = tokenize_examples(eval_ex, tokenizer, family, cfg, system_prompt)
    if not train_rows:
        raise UserError(f"Every one of the {train_stats['rows']} training rows is longer than --max-seq-length "
                        f"{cfg.max_seq_length} tokens (the shortest has {train_stats['shortest']}). Raise "
                        f"--max-seq-length to at least {train_stats['shortest']}, or pass --truncate to cut rows.")
    say(describe_data(train_stats, eval_stats, cfg))
    checkpointing, why, cap = modeling.choose_checkpointing(model, cfg)
    say(why)
    dequantized, why = dequantize.apply(model, cfg, checkpointing, modeling.free_gpu_bytes(), cap)
    say(why)
    model, targets = modeling.attach_lora(model, cfg, family, checkpointing, tokenizer, say)
    return Prepared(cfg, model, tokenizer, targets, system_prompt, train_rows, eval_rows, eval_ex,
                    dict(train=train_stats, eval=eval_stats), checkpointing, dequantized, cap)


def model_label(family, cfg):
    """The family's title for its preset model; otherwise the model's own name (a local folder or
    another Hub id: the real Gemma-3-270M is not the preset's Gemma-3-1B-it)."""
    from medtune.train.modeling import tiny_model_path

    if cfg.model in (None, family.default_model):
        return family.title
    if Path(str(cfg.model)) == tiny_model_path(family):  # what --smoke trains unless --model is given
        return f"{family.title} (tiny random-weight stand-in)"
    return f"{Path(str(cfg.model).rstrip('/')).name} ({family.name} family)"


def train(family, p, run_dir, checkpoint, callbacks):
    import torch

    from medtune.train.reporting import RunLog

    cfg = p.cfg
    if checkpoint is None and distributed.is_main():
        runfolder.write_start(run_dir, to_dict(cfg), p.system_prompt, p.tokenizer.chat_template,
                              [ex.as_row() for ex in p.eval_examples])
    log = RunLog(run_dir / runfolder.METRICS)
    trainer = build_trainer(p.model, p.tokenizer, p.train_rows, p.eval_rows, cfg, run_dir, [log, *callbacks],
                            p.checkpointing, p.cap)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    n = distributed.world_size()
    say(f"Training {model_label(family, cfg)} LoRA r={cfg.lora_r} on {', '.join(p.targets)}: "
        f"{trainer.args.max_steps if trainer.args.max_steps > 0 else 'epochs=' + str(cfg.epochs)} steps, effective "
        f"batch {effective_batch(cfg, n)} = batch {cfg.batch_size} x grad-accum {cfg.grad_accum} x {n} "
        f"process{'es' * (n > 1)}, on {describe_device()}{f', resuming from {checkpoint.name}' if checkpoint else ''}.")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - started
    if distributed.is_main():
        finish(family, p, run_dir, checkpoint, trainer, log, result, wall)
    return run_dir


def finish(family, p, run_dir, checkpoint, trainer, log, result, wall):
    """Rank 0, after training: the adapter and tokenizer, the loss curve, run_info.json, the summary."""
    import torch

    from medtune.train.modeling import copy_tokenizer_model
    from medtune.train.reporting import gib, plot_losses

    cfg = p.cfg
    p.model.save_pretrained(run_dir)
    if checkpoint:
        match_adapter_dtype(run_dir, checkpoint)
    p.tokenizer.save_pretrained(run_dir)
    has_spm = copy_tokenizer_model(cfg.model, run_dir)
    records = read_jsonl(run_dir / runfolder.METRICS, missing_ok=True)
    plot_losses(records, run_dir / runfolder.LOSS_CURVE, f"{model_label(family, cfg)} LoRA: {cfg.run_name}")
    losses = [r["loss"] for r in records if "loss" in r]
    eval_losses = [r["eval_loss"] for r in records if "eval_loss" in r]
    speed = log.throughput()
    n = distributed.world_size()
    gpu = torch.cuda.is_available()
    summary = {
        "steps": trainer.state.global_step, "wall_time_s": round(log.time_offset + wall, 1),  # every session's
        "train_loss": losses[-1] if losses else None,
        "train_loss_mean": whole_run_loss_mean(records, result.training_loss, trainer.state.global_step, checkpoint),
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "trained_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round(speed["tokens_per_s"], 1) if speed else None,
        "s_per_step": round(speed["s_per_step"], 3) if speed else None,
        "steady_state_steps": speed["steps_measured"] if speed else None,
        "peak_gpu_allocated_gib": round(gib(torch.cuda.max_memory_allocated()), 2) if gpu else None,
        "peak_gpu_reserved_gib": round(gib(torch.cuda.max_memory_reserved()), 2) if gpu else None,
        "resumed_from": checkpoint.name if checkpoint else None,
        "world_size": n, "effective_batch": effective_batch(cfg, n),
    }
    runfolder.write_run_info(run_dir, {
        "family": family.name, "base_model": cfg.model, "lora_targets": p.targets, "dtype": str(p.model.dtype),
        "device": describe_device(), "ddp_backend": distributed.backend(),
        "padding_free": bool(getattr(trainer, "padding_free", False)), "gradient_checkpointing": p.checkpointing,
        "micro_batch_token_cap": p.cap, "micro_batches_split": getattr(trainer, "split_micro_batches", None),
        "dequantized_once": p.dequantized, "lora_add": lora_add.path_of(p.model),
        "tokenizer_model_copied": has_spm,
        "data": p.data_stats, "summary": summary, "versions": versions(),
        "command": " ".join(sys.argv), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    print_summary(run_dir, summary)


def print_summary(run_dir, s):
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    mem = ("n/a (CPU)" if s["peak_gpu_reserved_gib"] is None else
           f"{s['peak_gpu_allocated_gib']:.2f} GiB allocated, {s['peak_gpu_reserved_gib']:.2f} GiB reserved")
    print(f"\nDone: {s['steps']} steps of effective batch {s['effective_batch']} on {s['world_size']} "
          f"process{'es' * (s['world_size'] > 1)} in {s['wall_time_s']:.0f} s"
          f"{' (resumed from ' + s['resumed_from'] + ')' if s['resumed_from'] else ''}.")
    print(f"  train loss {fmt(s['train_loss'], '.4f')} (last logged), eval loss {fmt(s['eval_loss'], '.4f')}")
    if s["tokens_per_s"] is None:
        print("  trained tokens/s n/a (too few steps for a steady state)")
    else:
        print(f"  trained tokens/s {s['tokens_per_s']:,.0f} (steady state, steps {s['steady_state_steps']}); "
              f"{s['s_per_step']:.3f} s/step")
    print(f"  peak GPU memory{' (rank 0)' * (s['world_size'] > 1)}: {mem}")
    print(f"Wrote {run_dir}/:")
    for name, what in runfolder.FILES.items():
        if (run_dir / name).exists():
            print(f"  {name:28s} {what}")
    ckpts = sorted(p.name for p in runfolder.checkpoints(run_dir))
    if ckpts:
        print(f"  {', '.join(ckpts):28s} trainer checkpoints (--resume)")
    if noise.where():
        print(noise.where())


@report_user_errors
def main(family_name):
    run(family_name)
    distributed.finish()
