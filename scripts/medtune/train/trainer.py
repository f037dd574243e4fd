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


def build_trainer(model, tokenizer, train_rows, eval_rows, cfg, run_dir, callbacks, checkpointing="unsloth", cap=None):
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
    if cap:
        split_long_micro_batches(trainer, cap)
    return trainer


def part_bounds(row_starts, total, cap):
    """[(begin, end)] of parts of whole rows, each of at most `cap` tokens where its rows allow (a row
    longer than cap is a part of its own), from the rows' first positions in a sequence of `total`."""
    ends = list(row_starts[1:]) + [total]
    bounds, begin, prev = [], 0, 0
    for end in ends:
        if end - begin > cap and prev > begin:
            bounds.append((begin, prev))
            begin = prev
        prev = end
    return bounds + [(begin, total)]


def split_rows(inputs, cap):
    """A micro-batch of more than `cap` tokens as parts of whole rows, each of at most cap tokens; None
    where it holds no more. Padding-free batches (one sequence of packed rows, each starting at position
    0) split along the sequence, and per-row tensors such as Unsloth's packed_seq_lengths (one entry per
    row; attention finds the rows' bounds there) split with their rows; padded batches (one row per line)
    split into groups of lines. None too where a tensor is neither per token nor per row, or where
    packed_seq_lengths disagrees with the positions: no part is given metadata that is not its own."""
    import torch

    ids = inputs["input_ids"]
    lines, width = ids.shape[0], ids.shape[-1]
    if lines * width <= cap:
        return None
    if lines == 1 and "position_ids" in inputs:
        starts = torch.nonzero(inputs["position_ids"][0] == 0).flatten().tolist() or [0]
        lengths = inputs.get("packed_seq_lengths")
        row_lengths = [e - b for b, e in zip(starts, starts[1:] + [width])]
        if lengths is not None and torch.as_tensor(lengths).tolist() != row_lengths:
            return None
        bounds, dim, size, first_row = part_bounds(starts, width, cap), 1, width, {s: i for i, s in enumerate(starts)}
        rows = [(first_row[b], first_row.get(e, len(starts))) for b, e in bounds]
    else:
        step = max(1, cap // width)
        bounds, dim, size = [(b, min(b + step, lines)) for b in range(0, lines, step)], 0, lines
        rows = bounds
    per_token = {k for k, v in inputs.items() if torch.is_tensor(v) and v.dim() > dim and v.shape[dim] == size
                 and (dim == 1) == (v.shape[0] == 1)}
    per_row = {k for k, v in inputs.items() if torch.is_tensor(v) and v.dim() == 1 and k not in per_token
               and v.numel() == rows[-1][1]}
    unknown = [k for k, v in inputs.items() if torch.is_tensor(v) and v.dim() and k not in per_token | per_row]
    if len(bounds) < 2 or unknown:
        return None
    return [{**inputs, **{k: inputs[k].narrow(dim, b, e - b) for k in per_token},
             **{k: inputs[k][r0:r1] for k in per_row}} for (b, e), (r0, r1) in zip(bounds, rows)]


def split_long_micro_batches(trainer, cap):
    """Train each micro-batch of more than `cap` tokens in parts of whole rows (split_rows), each part
    a forward and backward of its own with the micro-batch's loss normalization (num_items_in_batch:
    the loss summed over a part's tokens, divided by the step's token count), so that the gradients add
    up to the whole micro-batch's and the returned loss is its loss. Under DDP only the last part's
    backward synchronizes. trainer.split_micro_batches counts the micro-batches split."""
    import contextlib

    trainer.split_micro_batches = 0

    def training_step(model, inputs, num_items_in_batch=None):
        step = type(trainer).training_step
        parts = split_rows(inputs, cap) if num_items_in_batch is not None else None
        if not parts:  # without num_items_in_batch a part's loss is its own mean: no exact sum of parts
            return step(trainer, model, inputs, num_items_in_batch)
        trainer.split_micro_batches += 1
        loss = 0
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last else trainer.accelerator.no_sync(model):
                loss = loss + step(trainer, model, part, num_items_in_batch)
        return loss

    trainer.training_step = training_step


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
