"""One measurement of the GPU benchmark, in its own process (Unsloth patches transformers on import,
so the plain baseline must never share a process with it). Started by scripts/benchmark.py:

    python -m medtune.bench.worker SPEC.json RESULT.json

SPEC["job"] is one of: build (random full-size model, saved pre-quantized in 4-bit), matmul (the
GPU's bf16 matrix-multiply rate), train (one configuration: ours, baseline or notebook), budget
(training under a memory cap: the defaults at their worst case, then the longest length that fits).
"""
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from medtune.fileio import write_json_atomic

NOTEBOOK = dict(batch_size=2, grad_accum=4, max_seq_length=2048, r=16, alpha=16)


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory():
    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(spec):
    """A seeded random-weight model of the family's full size, quantized once to NF4 (double quant,
    bf16 compute, as the Unsloth -bnb-4bit uploads are) and saved, so each configuration loads the
    same 4-bit weights quickly."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from medtune.families import FAMILIES
    from medtune.train.modeling import build_random_model

    family = FAMILIES[spec["family"]]
    out = Path(spec["out"])
    dense = out.with_name(out.name + ".bf16")
    started = time.perf_counter()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    build_random_model(family, dense, family.full_config, device=device(), dtype=dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0} if torch.cuda.is_available() else "cpu")
    model.save_pretrained(out)
    for f in dense.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    shutil.rmtree(dense)
    return {"seconds": round(time.perf_counter() - started, 1),
            "size_gib": round(sum(f.stat().st_size for f in out.iterdir()) / 2**30, 2)}


def matmul(spec):
    """Best bf16 matrix-multiply rate over a few square sizes (FLOP/s), the denominator of MFU."""
    best = {}
    for n in spec.get("sizes", (4096, 8192, 16384)):
        a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        cuda_sync()
        reps = spec.get("reps", 20)
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        cuda_sync()
        best[n] = 2 * n ** 3 * reps / (time.perf_counter() - started)
        del a, b
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "flops_per_s": max(best.values()), "by_size": {str(k): round(v / 1e12, 1) for k, v in best.items()}}


def step_timer():
    """A callback keeping (step, seconds, input tokens seen) at the end of each optimizer step, with the
    GPU's work finished, and the logged losses. Built here: transformers may only be imported after
    Unsloth, and the baseline imports it without."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.start, self.losses = [], None, []

        def on_train_begin(self, args, state, control, **kw):
            cuda_sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            cuda_sync()
            self.steps.append((state.global_step, time.perf_counter() - self.start, state.num_input_tokens_seen))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return StepTimer()


def read_rows(spec):
    return json.loads(Path(spec["rows"]).read_text())


def lora_summary(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    return {"trainable_params": trainable, "lora_modules": modules}


def load_ours(spec, family, cfg):
    from medtune.train import modeling

    model, tokenizer, _ = modeling.load_model(spec["model"], cfg)
    family.prepare_tokenizer(tokenizer)
    model, targets = modeling.attach_lora(model, cfg, family)
    return model, tokenizer, targets


def ours_config(spec, **extra):
    from medtune.config import TrainConfig

    steps = spec["warmup"] + spec["steps"]
    return TrainConfig(model=spec["model"], max_steps=steps, save_steps=10**6, eval_samples=0, logging_steps=1,
                       warmup_steps=5, **{**spec.get("overrides", {}), **extra})


def train_ours(spec, family, rows, run_dir, timer):
    from medtune.train.trainer import build_trainer

    cfg = ours_config(spec)
    model, tokenizer, targets = load_ours(spec, family, cfg)
    trainer = build_trainer(model, tokenizer, rows, [], cfg, run_dir, [timer])
    settings = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "max_seq_length": cfg.max_seq_length,
                "packing": cfg.packing, "optim": cfg.optim}
    return model, trainer, targets, settings


def train_notebook(spec, family, rows, run_dir, timer):
    """The configuration of the Unsloth notebooks most users copy, Unsloth's defaults otherwise."""
    from unsloth import FastLanguageModel, is_bfloat16_supported
    from trl import SFTConfig, SFTTrainer

    from medtune.families import PROJECTIONS, linear_names, resolve_lora_targets

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=spec["model"], max_seq_length=2048, dtype=None,
                                                         load_in_4bit=True)
    family.prepare_tokenizer(tokenizer)
    # The notebooks name the 7 split projections; on Phi-3's fused weights the same layers are
    # qkv_proj and gate_up_proj, resolved as for every configuration here so that all attach alike.
    targets, _ = resolve_lora_targets(list(PROJECTIONS), linear_names(model))
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=targets, lora_alpha=16, lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False, loftq_config=None)
    from datasets import Dataset

    args = SFTConfig(
        per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=2e-4, fp16=not is_bfloat16_supported(),
        bf16=is_bfloat16_supported(), logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
        lr_scheduler_type="linear", seed=3407, output_dir=str(run_dir), report_to="none", max_length=2048,
        packing=False, save_strategy="no", include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), args=args,
                         callbacks=[timer])
    return model, trainer, targets, {"batch_size": 2, "grad_accum": 4, "max_seq_length": 2048, "packing": False,
                                     "optim": "adamw_8bit"}


def train_baseline(spec, family, rows, run_dir, timer):
    """Plain transformers + PEFT + bitsandbytes NF4 QLoRA: Hugging Face gradient checkpointing, SDPA
    attention, TRL padding each batch to its longest row."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from medtune.families import PROJECTIONS, linear_names, resolve_lora_targets

    assert "unsloth" not in sys.modules, "the baseline must run without Unsloth's patches"
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map={"": 0} if on_gpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    family.prepare_tokenizer(tokenizer)
    gc_kwargs = {"use_reentrant": False}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs=gc_kwargs)
    targets, _ = resolve_lora_targets(list(PROJECTIONS), linear_names(model))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                             bias="none", task_type="CAUSAL_LM"))
    args = SFTConfig(
        per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=2e-4, bf16=on_gpu, logging_steps=1,
        optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear", seed=3407, output_dir=str(run_dir),
        report_to="none", max_length=2048, packing=False, padding_free=False, gradient_checkpointing=True,
        gradient_checkpointing_kwargs=gc_kwargs, save_strategy="no", include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), args=args,
                         callbacks=[timer])
    return model, trainer, targets, {"batch_size": 2, "grad_accum": 4, "max_seq_length": 2048, "packing": False,
                                     "optim": "adamw_8bit"}


SETUPS = {"ours": train_ours, "baseline": train_baseline, "notebook": train_notebook}


def train(spec):
    from medtune.families import FAMILIES
    from medtune.bench.perf import steady_state

    if spec["setup"] != "baseline":
        import unsloth  # noqa: F401
    family = FAMILIES[spec["family"]]
    rows = read_rows(spec)
    timer = step_timer()
    with tempfile.TemporaryDirectory() as run_dir:
        model, trainer, targets, settings = SETUPS[spec["setup"]](spec, family, rows, run_dir, timer)
        lora = lora_summary(model)
        print(f"[{spec['setup']}] LoRA on {', '.join(targets)}: {lora['lora_modules']} modules, "
              f"{lora['trainable_params']:,} trainable parameters", flush=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    speed = steady_state(timer.steps, spec["warmup"])
    return {"setup": spec["setup"], "targets": targets, **lora, **settings, **memory(),
            "padding_free": bool(getattr(trainer.args, "padding_free", False)),
            "first_step_s": round(timer.steps[0][1], 1), "steps": len(timer.steps),
            "tokens": timer.steps[-1][2], "loss_first": timer.losses[0] if timer.losses else None,
            "loss_last": timer.losses[-1] if timer.losses else None, **(speed or {})}


def budget(spec):
    """Under a memory cap (a T4's 15 GB): the defaults with every row at --max-seq-length (their
    worst case), then, per batch size, the longest sequence length that still trains."""
    import unsloth  # noqa: F401

    from medtune.families import FAMILIES
    from medtune.bench.perf import synthetic_rows
    from medtune.train.trainer import build_trainer

    family = FAMILIES[spec["family"]]
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["cap_bytes"] / total)
    vocab = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]
    ladder = spec["ladder"]
    cfg = ours_config({**spec, "warmup": 0, "steps": 2}, max_seq_length=max(ladder))
    model, tokenizer, _ = load_ours(spec, family, cfg)
    results = {"cap_gib": round(spec["cap_bytes"] / 2**30, 2), "tries": []}

    def attempt(label, length, batch, grad_accum):
        from dataclasses import replace

        run_cfg = replace(cfg, max_seq_length=length, batch_size=batch, grad_accum=grad_accum)
        rows = synthetic_rows([length] * (batch * grad_accum * 2), vocab, seed=length)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = build_trainer(model, tokenizer, rows, [], run_cfg, run_dir, [])
            try:
                trainer.train()
                ok = True
            except torch.OutOfMemoryError:
                ok = False
            finally:
                del trainer
                model.zero_grad(set_to_none=True)
                gc.collect()
        record = {"check": label, "length": length, "batch_size": batch, "grad_accum": grad_accum, "fits": ok,
                  **memory(), "seconds": round(time.perf_counter() - started, 1)}
        results["tries"].append(record)
        print(f"[budget] {label}: {batch} x {length} tokens -> {'fits' if ok else 'out of memory'} "
              f"({record['peak_reserved_gib']} GiB reserved)", flush=True)
        return ok

    defaults = spec["defaults"]
    results["defaults_fit"] = attempt("defaults", defaults["max_seq_length"], defaults["batch_size"],
                                      defaults["grad_accum"])
    for batch in spec["batches"]:
        longest = None
        for length in ladder:
            if not attempt(f"batch {batch}", length, batch, 1):
                break
            longest = length
        results[f"longest_batch_{batch}"] = longest
    return results


JOBS = {"build": build, "matmul": matmul, "train": train, "budget": budget}


def main():
    spec_path, result_path = map(Path, sys.argv[1:3])
    spec = json.loads(spec_path.read_text())
    for k, v in spec.get("env", {}).items():
        os.environ[k] = v
    write_json_atomic(result_path, JOBS[spec["job"]](spec), indent=1)


if __name__ == "__main__":
    main()
