"""The TRL trainer of a run and what a run records about its machine: the SFTTrainer built from a
TrainConfig, library versions, the device, the out-of-memory advice, the system prompt file.
Used by the training command (medtune.train.cli) and the benchmark's workers."""
import platform
from importlib import metadata

from medtune import distributed
from medtune.config import effective_batch, resolve_path
from medtune.errors import UserError

LIBRARIES = ("torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "datasets", "bitsandbytes",
             "accelerate")


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


def build_trainer(model, tokenizer, train_rows, eval_rows, cfg, run_dir, callbacks, checkpointing="unsloth"):
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
        # TRL turns Hugging Face checkpointing on by default: off when none was chosen.
        **({"gradient_checkpointing": False} if checkpointing == "false" else {}),
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
