"""One measurement of the GPU benchmark, in its own process (Unsloth patches transformers on import,
so the plain baseline must never share a process with it). Started by scripts/benchmark.py:

    python -m medtune.bench.worker SPEC.json RESULT.json

SPEC["job"] is one of: build (random full-size model, saved pre-quantized in 4-bit), matmul (the
GPU's bf16 matrix-multiply rate), train (one configuration of medtune/bench/setups.py: ours, baseline
or notebook; under torchrun for several GPUs), budget (training under a memory cap: the defaults at
their worst case, then the longest length that fits).
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
from medtune.bench.pauses import FullCollections, compile_events


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory():
    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def alloc_retries():
    """How many times so far the CUDA caching allocator found no free block, released its whole cache
    (waiting for the GPU) and asked the driver again: each costs a stall."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


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
    """A callback keeping (step, seconds, input tokens seen, compile events, seconds of full garbage
    collections, allocator retries so far) at the end of each optimizer step, with the GPU's work finished, and the logged
    losses. Built here: transformers may only be imported after Unsloth, and the baseline imports it without."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.start, self.losses, self.collections = [], None, [], FullCollections()

        def on_train_begin(self, args, state, control, **kw):
            cuda_sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            cuda_sync()
            self.steps.append((state.global_step, time.perf_counter() - self.start, state.num_input_tokens_seen,
                               compile_events(), self.collections.seconds, alloc_retries()))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return StepTimer()


def profile_callback(step, result):
    """A callback profiling optimizer step `step` (a steady-state one) with torch.profiler and putting
    where the GPU's time went into result["profile"] (medtune.bench.perf.profile_buckets)."""
    from torch.autograd import DeviceType
    from transformers import TrainerCallback

    from medtune.bench.perf import lora_kernels, profile_buckets

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == step:
                cuda_sync()
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                                if torch.cuda.is_available() else [])
                self.prof = torch.profiler.profile(activities=acts, record_shapes=True)
                self.prof.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == step:
                cuda_sync()
                wall = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)
                # Kernels only: an operator's row, and a GPU annotation such as "Optimizer.step#AdamW.step",
                # repeat the time of the kernels under them.
                kernels = [(e.key, e.self_device_time_total) for e in self.prof.key_averages()
                           if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
                           and not getattr(e, "is_user_annotation", False) and "#" not in e.key]
                lora = lora_kernels(self.prof.events(), lora_rank(kw.get("model")))
                result["profile"] = {"step": step, "wall_ms": round(wall * 1e3, 1),
                                     **profile_buckets(kernels, lora)}
                self.prof = None

    return Profile()


def lora_rank(model):
    """The rank of the model's LoRA adapters (PEFT's `r` of the first LoRA layer), None without any."""
    for module in (model.modules() if model is not None else ()):
        r = getattr(module, "r", None)
        if isinstance(r, dict) and r:
            return next(iter(r.values()))
    return None


def varlen_probe_state():
    """The keys of Unsloth's varlen-probe cache and how many decoder blocks took the compiled varlen
    path ({} without Unsloth's packed attention)."""
    try:
        from unsloth.utils import hf_packed_attention as packed
    except ImportError:
        return {}
    return {"keys": sorted(map(str, packed._VARLEN_IN_GRAPH)), "compiled": packed.HF_PACKED_ATTENTION_STATS["compiled"]}


def train(spec):
    """One configuration: speed after the warm-up, memory, every logged loss; under torchrun (the
    benchmark's --gpus) one such process per GPU, rank 0 reporting."""
    from medtune import distributed
    from medtune.bench.perf import steady_state
    from medtune.bench.setups import SETUPS, read_rows, lora_summary
    from medtune.families import FAMILIES

    if spec["setup"] != "baseline":
        import unsloth  # noqa: F401
    distributed.start()
    if spec.get("cap_bytes") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["cap_bytes"] / total)
    family = FAMILIES[spec["family"]]
    timer, result = step_timer(), {}
    callbacks = [timer] + ([profile_callback(spec["warmup"] + spec["steps"] + 1, result)] if spec.get("profile") else [])
    with tempfile.TemporaryDirectory() as run_dir:
        model, trainer, targets, settings = SETUPS[spec["setup"]](spec, family, read_rows(spec), run_dir, callbacks)
        lora = lora_summary(model)
        print(f"[{spec['setup']}] LoRA on {', '.join(targets)}: {lora['lora_modules']} modules, "
              f"{lora['trainable_params']:,} trainable parameters; {settings}", flush=True)
        probe_before = varlen_probe_state()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with timer.collections:
            trainer.train()
    measured = [s for s in timer.steps if s[0] <= spec["warmup"] + spec["steps"]]
    speed = steady_state(measured, spec["warmup"])
    steps = list(zip([(0, 0.0, 0, 0, 0.0, 0)] + measured, measured))  # (end of the step before, end of this one)
    step_tokens = [b[2] - a[2] for a, b in steps]
    result.update({"setup": spec["setup"], "targets": targets, **lora, **settings, **memory(),
                   "padding_free": bool(getattr(trainer.args, "padding_free", False)),
                   "first_step_s": round(timer.steps[0][1], 1), "steps": len(measured), "tokens": measured[-1][2],
                   "losses": timer.losses, "world_size": distributed.world_size(),
                   "largest_step_tokens": max(step_tokens), "step_tokens": step_tokens,
                   "step_seconds": [round(b[1] - a[1], 3) for a, b in steps],
                   # Seconds of each step spent in CPython's full collections (the GPU idles through them).
                   "step_gc_seconds": [round(b[4] - a[4], 3) for a, b in steps],
                   "step_alloc_retries": [b[5] - a[5] for a, b in steps],
                   "micro_batches_split": getattr(trainer, "split_micro_batches", None),
                   "varlen_probe": {"before_training": probe_before, "after": varlen_probe_state()},
                   "cap_gib": round(spec["cap_bytes"] / 2**30, 2) if spec.get("cap_bytes") else None, **(speed or {})})
    return result if distributed.is_main() else None


def budget(spec):
    """Under a memory cap (a T4's 15 GB): the defaults with every row at --max-seq-length (their
    worst case), then, per batch size in spec["batches"], the longest sequence length that still trains."""
    import unsloth  # noqa: F401

    from medtune.bench.perf import synthetic_rows
    from medtune.bench.setups import load_ours, ours_config
    from medtune.families import FAMILIES
    from medtune.train.trainer import build_trainer

    family = FAMILIES[spec["family"]]
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["cap_bytes"] / total)
    vocab = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]
    ladder = spec["ladder"]
    cfg = ours_config({**spec, "warmup": 0, "steps": 2}, max_seq_length=max([spec["defaults"]["max_seq_length"], *ladder]))
    model, tokenizer, _, checkpointing, _, cap = load_ours(spec, family, cfg)
    results = {"cap_gib": round(spec["cap_bytes"] / 2**30, 2), "gradient_checkpointing": checkpointing, "tries": []}

    def attempt(label, length, batch, grad_accum):
        from dataclasses import replace

        run_cfg = replace(cfg, max_seq_length=length, batch_size=batch, grad_accum=grad_accum)
        rows = synthetic_rows([length] * (batch * grad_accum * 2), vocab, seed=length)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = build_trainer(model, tokenizer, rows, [], run_cfg, run_dir, [], checkpointing, cap)
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
    for batch in spec.get("batches", []):
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
    result = JOBS[spec["job"]](spec)
    if result is not None:  # None: a rank other than 0 of a multi-GPU run
        write_json_atomic(result_path, result, indent=1)


if __name__ == "__main__":
    main()
