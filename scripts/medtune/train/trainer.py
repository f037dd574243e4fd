"""Fine-tune a model family for medical step-by-step reasoning: Unsloth 4-bit model + LoRA, TRL
SFTTrainer, loss on the assistant turn only. The module behind scripts/train_phi.py and
scripts/train_mistral.py, which write checkpoints/<run-name>/.

    python scripts/train_phi.py --smoke     # offline quickstart: tiny model, bundled sample, CPU
    python scripts/train_phi.py             # the real run: Phi-3-mini on medical-o1-reasoning-SFT
    torchrun --nproc_per_node 2 scripts/train_phi.py   # the same, data-parallel on 2 GPUs

Under torchrun or accelerate launch every process trains on its own share of the data and only rank 0
prints and writes the run folder (see medtune/distributed.py).
"""
import dataclasses
import json
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from medtune import distributed, noise
from medtune.config import default_max_steps, effective_batch, parse_config, resolve_path, to_dict
from medtune.errors import UserError, report_user_errors
from medtune.families import FAMILIES
from medtune.train.resume import (check_run_dir_path, check_world_size, match_adapter_dtype, newest_checkpoint,
                                  nothing_left, resume_config, whole_run_loss_mean)

LIBRARIES = ("torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "datasets", "bitsandbytes",
             "accelerate")


def say(*args, **kwargs):
    """print, on rank 0 only: one line per event, not one per process."""
    if distributed.is_main():
        print(*args, flush=True, **kwargs)


def read_system_prompt(cfg):
    path = resolve_path(cfg.system_prompt_file)
    if not path.is_file() or not path.read_text().strip():
        raise UserError(f"The system prompt file {cfg.system_prompt_file} is missing or empty. Point "
                        "--system-prompt-file at a text file (the default is prompts/system_prompt.txt).")
    from medtune.export.modelfile import quoting_problem

    if problem := quoting_problem(path.read_text().strip()):  # refused now, not after a long run and its export
        raise UserError(f"The system prompt in {cfg.system_prompt_file} can't go into the Ollama Modelfile that "
                        f"export writes: {problem}.")
    return path.read_text().strip()


def versions():
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe_device():
    import torch

    one = "cpu"
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        one = f"cuda:{index} {props.name} ({props.total_memory / 2**30:.1f} GiB)"
    n = distributed.world_size()
    return one if n == 1 else f"{n} processes ({distributed.backend()}), rank 0 on {one}"


def build_trainer(model, tokenizer, train_rows, eval_rows, cfg, run_dir, callbacks):
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(run_dir), run_name=cfg.run_name, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, optim=cfg.optim,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, lr_scheduler_type=cfg.lr_scheduler,
        max_steps=cfg.max_steps or -1, num_train_epochs=cfg.epochs or 1,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="steps" if eval_rows else "no",
        eval_steps=cfg.eval_steps, report_to=cfg.report_to, max_length=cfg.max_seq_length, packing=cfg.packing,
        fp16=on_gpu and model.dtype == torch.float16, bf16=on_gpu and model.dtype == torch.bfloat16,
        include_num_input_tokens_seen="non_padding", dataset_num_proc=1,
        # Under DDP: every LoRA weight gets a gradient each step, and searching for unused ones breaks
        # reentrant gradient checkpointing ("marked as ready twice").
        ddp_find_unused_parameters=False,
    )
    import datasets

    datasets.disable_progress_bars()  # rows arrive tokenized and fitted: TRL's preparation passes are no-ops
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, args=args, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
    )
    trainer.remove_callback(ProgressCallback)
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer


def out_of_memory_message(cfg):
    import torch

    where = "the GPU"
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        where = (f"cuda:{index} {props.name} ({props.total_memory / 2**30:.1f} GiB; peak reserved by this process "
                 f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB)")
    n = distributed.world_size()
    rank = f"rank {distributed.rank()} of {n}: " if n > 1 else ""
    return (f"{rank}CUDA ran out of memory on {where} with --batch-size {cfg.batch_size} per process and "
            f"--max-seq-length {cfg.max_seq_length}. Lower --batch-size (raise --grad-accum to keep the effective "
            f"batch of {effective_batch(cfg, n)} = {cfg.batch_size} x {cfg.grad_accum} x {n} process{'es' * (n > 1)}) "
            "or lower --max-seq-length, and close other programs using the GPU.")


def write_text(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def run(family_name, argv=None, callbacks=()):
    family = FAMILIES[family_name]
    script = f"scripts/train_{'phi' if family_name == 'phi3' else family_name}.py"
    cfg, given = parse_config(sys.argv[1:] if argv is None else argv, family_name, script,
                              f"Fine-tune {family.title} for medical step-by-step reasoning (Unsloth 4-bit LoRA + TRL).")
    run_dir = Path(cfg.output_dir).expanduser() / cfg.run_name
    noise.divert("train" if distributed.is_main() else f"train-rank{distributed.rank()}", cfg.verbose)
    check_run_dir_path(run_dir)
    checkpoint = None
    if cfg.resume:
        if not run_dir.is_dir():
            raise UserError(f"--resume: there is no run folder {run_dir} to continue. Check --run-name and "
                            "--output-dir, or start the run without --resume.")
        cfg = resume_config(run_dir, cfg, given)
        checkpoint = newest_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(f"--resume: {run_dir} holds no trainer checkpoint (checkpoint-N folders are written every "
                            f"--save-steps {cfg.save_steps} steps). Start again with --overwrite.")
        check_world_size(checkpoint, cfg, script)
        if done := nothing_left(run_dir, checkpoint, cfg):
            say(done)
            return run_dir
    elif run_dir.exists() and not cfg.overwrite:
        raise UserError(f"The run folder {run_dir} already exists. Add --resume to continue it, --overwrite to "
                        "replace it, or choose another --run-name.")
    if cfg.max_steps is None and cfg.epochs is None:
        cfg = dataclasses.replace(cfg, max_steps=default_max_steps(cfg, distributed.world_size()))

    # Everything that can be checked is checked before anything is written. Every rank checks the
    # same arguments and files, so a mistake stops every rank here, before they wait for each other.
    from medtune.train.data import load_rows, split_examples, to_examples, tokenize_examples

    system_prompt = read_system_prompt(cfg)
    say(f"Loading data from {cfg.dataset} ...")
    examples = to_examples(load_rows(cfg), cfg.dataset)
    distributed.start()
    from medtune.train import modeling  # imports Unsloth (slow), after the cheap checks
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
    model, targets = modeling.attach_lora(model, cfg, family)

    # From here on rank 0 writes the run folder: only after every rank has looked at it above, and
    # before any rank trains (the others write their random state into its checkpoints).
    fresh = checkpoint is None
    distributed.barrier()
    if fresh and distributed.is_main():
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    distributed.barrier()
    try:
        return _train(family, cfg, run_dir, checkpoint, model, tokenizer, train_rows, eval_rows, system_prompt,
                      eval_ex, dict(train=train_stats, eval=eval_stats), targets, callbacks)
    except BaseException as e:
        if fresh and newest_checkpoint(run_dir) is None:
            if distributed.is_main():
                shutil.rmtree(run_dir, ignore_errors=True)
            where = "Nothing was kept."
        else:
            where = f"Checkpoints are kept in {run_dir}: add --resume to continue."
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            raise UserError(out_of_memory_message(cfg) + " " + where, rank_specific=True) from None
        if isinstance(e, KeyboardInterrupt):
            say(f"\nTraining interrupted. {where}", file=sys.stderr)
        raise


def _train(family, cfg, run_dir, checkpoint, model, tokenizer, train_rows, eval_rows, system_prompt, eval_ex,
           data_stats, targets, callbacks):
    import torch

    from medtune.train.modeling import copy_tokenizer_model
    from medtune.train.reporting import RunLog, gib, plot_losses, read_metrics

    rank0 = distributed.is_main()
    if checkpoint is None and rank0:
        write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_text(run_dir / "system_prompt.txt", system_prompt + "\n")
        write_text(run_dir / "chat_template.jinja", tokenizer.chat_template)
        write_text(run_dir / "heldout.jsonl", "".join(json.dumps(ex.as_row()) + "\n" for ex in eval_ex))
    log = RunLog(run_dir / "metrics.jsonl")
    trainer = build_trainer(model, tokenizer, train_rows, eval_rows, cfg, run_dir, [log, *callbacks])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    n = distributed.world_size()
    say(f"Training {family.title} LoRA r={cfg.lora_r} on {', '.join(targets)}: "
        f"{trainer.args.max_steps if trainer.args.max_steps > 0 else 'epochs=' + str(cfg.epochs)} steps, effective "
        f"batch {effective_batch(cfg, n)} = batch {cfg.batch_size} x grad-accum {cfg.grad_accum} x {n} "
        f"process{'es' * (n > 1)}, on {describe_device()}{f', resuming from {checkpoint.name}' if checkpoint else ''}.")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - started

    if not rank0:
        return run_dir
    model.save_pretrained(run_dir)
    if checkpoint:
        match_adapter_dtype(run_dir, checkpoint)
    tokenizer.save_pretrained(run_dir)
    has_spm = copy_tokenizer_model(cfg.model, run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    plot_losses(records, run_dir / "loss_curve.png", f"{family.title} LoRA: {cfg.run_name}")
    losses = [r["loss"] for r in records if "loss" in r]
    eval_losses = [r["eval_loss"] for r in records if "eval_loss" in r]
    speed = log.throughput()
    summary = {
        "steps": trainer.state.global_step, "wall_time_s": round(log.time_offset + wall, 1),  # every session's
        "train_loss": losses[-1] if losses else None,
        "train_loss_mean": whole_run_loss_mean(records, result.training_loss, trainer.state.global_step, checkpoint),
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "trained_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round(speed["tokens_per_s"], 1) if speed else None,
        "s_per_step": round(speed["s_per_step"], 3) if speed else None,
        "steady_state_steps": speed["steps_measured"] if speed else None,
        "peak_gpu_allocated_gib": round(gib(torch.cuda.max_memory_allocated()), 2) if torch.cuda.is_available() else None,
        "peak_gpu_reserved_gib": round(gib(torch.cuda.max_memory_reserved()), 2) if torch.cuda.is_available() else None,
        "resumed_from": checkpoint.name if checkpoint else None,
        "world_size": n, "effective_batch": effective_batch(cfg, n),
    }
    info = {
        "family": family.name, "base_model": cfg.model, "lora_targets": targets, "dtype": str(model.dtype),
        "device": describe_device(), "ddp_backend": distributed.backend(),
        "padding_free": bool(getattr(trainer, "padding_free", False)), "tokenizer_model_copied": has_spm, "data": data_stats, "summary": summary, "versions": versions(),
        "command": " ".join(sys.argv), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text(run_dir / "run_info.json", json.dumps(info, indent=2) + "\n")
    print_summary(run_dir, summary)
    return run_dir


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
    described = {
        "adapter_model.safetensors": "LoRA adapter", "adapter_config.json": "LoRA config (base model id inside)",
        "tokenizer.json": "tokenizer", "tokenizer.model": "SentencePiece model (for llama.cpp export)",
        "chat_template.jinja": "chat template used", "system_prompt.txt": "system prompt used",
        "config.yaml": "every option (reproduce with --config)", "run_info.json": "versions, data counts, summary",
        "metrics.jsonl": "every logged value", "loss_curve.png": "train and eval loss", "heldout.jsonl": "held-out rows",
    }
    for name, what in described.items():
        if (run_dir / name).exists():
            print(f"  {name:28s} {what}")
    ckpts = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    if ckpts:
        print(f"  {', '.join(ckpts):28s} trainer checkpoints (--resume)")
    if noise.where():
        print(noise.where())


@report_user_errors
def main(family_name):
    run(family_name)
    distributed.finish()
