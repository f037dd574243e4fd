"""The GPU benchmark's pieces that run without a GPU: length model, synthetic rows, FLOP count, report,
and the script's refusal on a machine without CUDA."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from medtune.families import FAMILIES
from medtune.bench.perf import (LengthModel, hardware_flops_per_token, medical_o1_lengths, mfu, model_flops_per_token,
                                parameter_count, prompt_length, steady_state, synthetic_rows)
from medtune.bench.report import check_targets, render_markdown

SCRIPT = str(REPO / "scripts" / "benchmark.py")


def test_length_model_matches_its_mean_and_the_training_limit():
    model = medical_o1_lengths("phi3")
    assert 900 < model.mean < 930  # 83 template tokens + 2,880 characters at 3.46 characters per token
    lengths = model.sample(20000, 2048, seed=0)
    assert min(lengths) >= model.minimum and max(lengths) <= 2048
    mean = sum(lengths) / len(lengths)
    assert abs(mean - model.mean) / model.mean < 0.03  # rows over 2048 dropped only trim the tail
    assert sum(x > 1500 for x in lengths) > 200  # a real spread, not a constant
    assert lengths[:50] == model.sample(20000, 2048, seed=0)[:50]
    assert lengths[:50] != model.sample(50, 2048, seed=1)
    assert max(LengthModel(mean=900).sample(2000, 1024, seed=0)) <= 1024


def test_synthetic_rows_mask_the_prompt_like_training():
    lengths = [100, 700, 2048]
    rows = synthetic_rows(lengths, 32064, seed=0, family="mistral")
    for n, row in zip(lengths, rows):
        p = prompt_length(n, "mistral")
        assert len(row["input_ids"]) == len(row["labels"]) == n
        assert row["labels"][:p] == [-100] * p and row["labels"][p:] == row["input_ids"][p:]
        assert row["input_ids"][0] == 1 and all(3 <= t < 32000 for t in row["input_ids"][1:])
    assert synthetic_rows(lengths, 32064, seed=0) == synthetic_rows(lengths, 32064, seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_a_real_model(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = FAMILIES[family]
    sizes = dict(spec.tiny_config, num_key_value_heads=2)  # grouped-query attention for both
    config = AutoConfig.for_model(spec.model_type, **sizes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(sizes, spec.model_type) == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_the_full_architectures():
    assert parameter_count(FAMILIES["phi3"].full_config) == 3_821_079_552  # Phi-3-mini: "3.8B"
    assert parameter_count(FAMILIES["mistral"].full_config) == 7_241_732_096  # Mistral-7B: "7.24B"


def test_mfu_and_steady_state():
    assert model_flops_per_token(1e9) == 4e9
    assert hardware_flops_per_token(1e9, recomputed=True) == 6e9 and hardware_flops_per_token(1e9, False) == 4e9
    assert mfu(3.8e9, 16_000, 800e12) == pytest.approx(4 * 3.8e9 * 16_000 / 800e12)
    steps = [(1, 30.0, 1000), (2, 31.0, 2000), (3, 32.0, 3000), (4, 32.5, 4000), (5, 33.0, 5000), (6, 33.5, 6000),
             (7, 34.0, 7000)]
    speed = steady_state(steps, warmup=5)  # the 30 s compile of step 1 is left out
    assert speed["tokens_per_s"] == pytest.approx(2000) and speed["s_per_step"] == pytest.approx(0.5)
    assert speed["steps_measured"] == "6-7"
    assert steady_state(steps[:5], warmup=5) is None
    # Step 7 compiled a new shape of a block (its compile count rose): left out and named.
    steps = [(*s, 3) for s in steps[:6]] + [(7, 36.0, 7000, 5), (8, 36.5, 8000, 5), (9, 37.0, 9000, 5)]
    speed = steady_state(steps, warmup=5)
    assert speed["tokens_per_s"] == pytest.approx(2000) and speed["s_per_step"] == pytest.approx(0.5)
    assert speed["steps_measured"] == "6-9 less 1 that compiled" and speed["compiling_steps"] == [7]


def run_result(tokens_per_s, reserved, trainable=25_165_824, batch=(8, 1), checkpointing="false", losses=None):
    return {"tokens_per_s": tokens_per_s, "s_per_step": 7400 / tokens_per_s, "peak_allocated_gib": reserved - 0.2,
            "peak_reserved_gib": reserved, "trainable_params": trainable, "lora_modules": 128,
            "batch_size": batch[0], "grad_accum": batch[1], "padding_free": True,
            "gradient_checkpointing": checkpointing, "losses": losses or [2.0 - 0.01 * i for i in range(21)]}


REPORT = {
    "date": "2026-12-01 02:25 UTC", "gpu": "NVIDIA H200", "steps": 15, "warmup": 5,
    "versions": {"torch": "2.11.0", "unsloth": "2026.10.9"},
    "matmul": {"flops_per_s": 800e12, "by_size": {"8192": 800.0}},
    "models": {"phi3": {
        "title": "Phi-3-mini-4k-instruct", "params": 3_821_079_552,
        "lengths": {"description": "log-normal", "mean": 924.0},
        "runs": {"ours": {**run_result(25_000, 31.9), "profile": {
                     "step": 21, "wall_ms": 300.0, "device_ms": 280.0, "top": [["nvjet_gemm", 120.0]],
                     "buckets": {"matmuls": 200.0, "4-bit dequantization": 30.0, "attention": 20.0, "other": 30.0}}},
                 "notebook": run_result(17_000, 4.3, checkpointing="unsloth"),
                 "baseline": run_result(4_900, 18.2, checkpointing="true"),
                 "notebook_2x4": run_result(8_400, 3.0, batch=(2, 4), checkpointing="unsloth")},
        "tuning": [{"change": "Unsloth's offloaded checkpointing (the previous default)",
                    "overrides": {"gradient_checkpointing": "unsloth"},
                    **run_result(17_500, 4.3, checkpointing="unsloth",
                                 losses=[(2.0 - 0.01 * i) * 1.004 for i in range(21)])}],
        "budget": {"cap_gib": 13.97, "defaults_fit": True, "gradient_checkpointing": "unsloth",
                   "tries": [{"check": "defaults", "length": 2048, "batch_size": 8, "grad_accum": 1, "fits": True,
                              "peak_reserved_gib": 5.9}]},
        "capped": {"ours": run_result(17_400, 4.3, checkpointing="unsloth"),
                   "notebook": run_result(17_300, 4.3, checkpointing="unsloth")},
    }},
}


def test_report_compares_at_equal_batch_with_mfu_both_ways():
    md = render_markdown(REPORT)
    # 4 x 3.82e9 x 25e3 / 8e14 = 47.8%; without recomputation the GPU does just that.
    assert "| (a) this project, defaults | 8 x 1, padding-free | none | 25,000 | 0.30 | 31.70 | 31.90 | 47.8% | 47.8% |" in md
    # The notebook recomputes the forward: 6N of hardware FLOPs against 4N of model FLOPs.
    assert ("| (b) Unsloth notebook config, this project's batch | 8 x 1, padding-free | Unsloth (offloaded) | 17,000 |"
            in md and "| 32.5% | 48.7% |" in md)
    assert "| reference: Unsloth notebook config as published | 2 x 4, padding-free |" in md
    assert "notebook 1.47x, baseline 5.10x, notebook as published 2.98x" in md
    assert "only difference is gradient checkpointing (none against Unsloth (offloaded))" in md
    assert "| matmuls | 200.0 | 71% |" in md and "`nvjet_gemm` 120.0 ms" in md
    assert "| Unsloth's offloaded checkpointing (the previous default) | 17,500 | 0.70x |" in md and "| 0.40% |" in md
    assert "gradient checkpointing chosen under the cap: Unsloth (offloaded)" in md and "Defaults fit: yes." in md
    assert "NVIDIA H200" in md and "800 TFLOP/s" in md and "unsloth 2026.10.9" in md
    lines = check_targets(REPORT)
    assert "phi3: speed vs notebook config at equal batch 1.47x (target >= 1.4x): met" in lines
    assert "phi3: speed vs transformers + PEFT at equal batch 5.10x (target >= 5x): met" in lines
    assert "phi3: MFU (4N) 47.8% (target >= 45%): met" in lines
    assert "phi3: first 20 losses vs the same training with Unsloth's checkpointing, largest difference 0.40% (target <= 1%): met" in lines
    assert "phi3: under the 15 GB cap, speed vs notebook config 1.01x (target >= 0.97x): met" in lines
    assert "phi3: defaults within 13.97 GiB: met" in lines
    assert not any("more GPUs" in line for line in lines)  # not run: no line claims it


def test_report_names_the_loader_where_the_notebook_loads_a_family_otherwise():
    """Mistral: FastLanguageModel (the notebook) swaps in Unsloth's own forwards, this project's
    FastModel does not; for Phi-3 both load alike. The report says which differences there are."""
    from medtune.bench.report import where_gains_come_from

    entry = REPORT["models"]["phi3"]
    assert "against (b) the only difference is gradient checkpointing" in where_gains_come_from(entry, "phi3")
    mistral = where_gains_come_from(entry, "mistral")
    assert "against (b) two differences: gradient checkpointing" in mistral and "FastModel" in mistral
    assert "over 5 measured steps" in render_markdown({**REPORT, "models": {"phi3": {**entry, "steps": 5}}})
    copies = copy.deepcopy(entry)
    copies["runs"]["ours"]["dequantized_once"] = True
    said = where_gains_come_from(copies, "phi3")
    assert "against (b) two differences: gradient checkpointing" in said and "16-bit copies dequantized once" in said
    assert "against (b) three differences" in where_gains_come_from(copies, "mistral")
    assert "| defaults: none checkpointing, 16-bit copies of the 4-bit weights (auto) |" in render_markdown(
        {**REPORT, "models": {"phi3": copies}})
    summed = copy.deepcopy(copies)
    summed["runs"]["ours"]["lora_add"] = "kernel"
    assert ("| defaults: none checkpointing, 16-bit copies of the 4-bit weights, LoRA's product summed in the kernel "
            "after it (auto) |") in render_markdown({**REPORT, "models": {"phi3": summed}})
    assert "three differences" in where_gains_come_from(summed, "phi3") and "LoRA's sum" in where_gains_come_from(summed, "phi3")
    summed["runs"]["ours"]["lora_add"] = "triton"
    assert ", LoRA's product added by a Triton kernel without the copy (auto) |" in render_markdown(
        {**REPORT, "models": {"phi3": summed}})
    assert "LoRA's sum (the product added by a Triton kernel" in where_gains_come_from(summed, "phi3")
    # An 80 GB card: auto trained Mistral's 8 rows a step as 4 x 2 to keep every activation.
    split = copy.deepcopy(copies)
    split["runs"]["ours"].update(batch_size=4, grad_accum=2)
    said = where_gains_come_from(split, "mistral")
    assert "against (b) four differences" in said and "the micro-batch (4 x grad-accum 2 against 8 x 1" in said
    assert "| (a) this project, defaults | 4 x 2, padding-free |" in render_markdown({**REPORT, "models": {"mistral": split}})
    # Since then: the asked micro-batch with a cap on its tokens, said in the batch column.
    capped = copy.deepcopy(copies)
    capped["runs"]["ours"]["micro_batch_token_cap"] = 9679
    assert "three differences" in where_gains_come_from(capped, "mistral")
    assert "| (a) this project, defaults | 8 x 1, padding-free, at most 9,679 tokens a micro-batch |" in render_markdown(
        {**REPORT, "models": {"mistral": capped}})


def test_report_names_the_measured_steps_that_compiled():
    report = copy.deepcopy(REPORT)
    runs = report["models"]["phi3"]["runs"]
    assert "torch.compile compiled" not in render_markdown(report)  # results from before the worker recorded it
    runs["ours"]["compiling_steps"], runs["notebook"]["compiling_steps"] = [9, 14], []
    assert ("Measured steps left out because torch.compile compiled during them (a new shape of a compiled block: "
            "a one-off cost a long run does not repeat): (a) 9, 14; (b) none.") in render_markdown(report)


def test_report_names_the_garbage_collections_of_the_measured_steps():
    report = copy.deepcopy(REPORT)
    runs = report["models"]["phi3"]["runs"]
    assert "garbage collections" not in render_markdown(report)  # results from before the worker recorded them
    runs["ours"]["step_gc_seconds"] = [0.9] + [0.0] * 19  # step 1 is warm-up: not named
    runs["notebook"]["step_gc_seconds"] = [0.0] * 8 + [0.812] + [0.0] * 5 + [0.004] + [0.0] * 5
    assert ("Full garbage collections of Python during the measured steps (the GPU runs out of queued work while one "
            "runs), 0.01 s or more: (a) none; (b) 0.81 s in step 9.") in render_markdown(report)


def test_full_collections_are_timed_and_younger_ones_are_not():
    import gc

    from medtune.bench.pauses import FullCollections

    gc.disable()  # only the collections asked for here
    try:
        with FullCollections() as full:
            gc.collect(0)
            gc.collect(1)
            assert full.count == 0
            gc.collect()
            gc.collect(2)
            assert full.count == 2 and full.seconds > 0
        gc.collect()
        assert full.count == 2  # no longer listening
    finally:
        gc.enable()


def test_report_flags_configurations_that_attach_lora_differently_and_failed_runs():
    report = copy.deepcopy(REPORT)
    runs = report["models"]["phi3"]["runs"]
    runs["notebook"]["trainable_params"] = 10_000_000  # e.g. split names on fused Phi-3 weights
    runs["baseline"] = {"error": "exit 1", "log": "logs/03-phi3-baseline.log"}
    report["models"]["phi3"]["tuning"][0]["losses"] = [2.0] * 21
    lines = check_targets(report)
    assert any("differ between configurations" in line and "NOT comparable" in line for line in lines)
    assert "phi3: speed vs transformers + PEFT at equal batch: not measured" in lines
    assert any(line.startswith("phi3: first 20 losses") and line.endswith("NOT met") for line in lines)
    assert "failed: see logs/03-phi3-baseline.log" in render_markdown(report)


def test_scaling_over_gpus_is_reported_against_one_gpu():
    report = copy.deepcopy(REPORT)
    report["models"]["phi3"]["scale"] = {"gpus": 2, "run": run_result(46_000, 32.0)}
    assert "phi3: speed-up on more GPUs 1.84x (target >= 1.85x): NOT met" in check_targets(report)
    assert "| (a) on 2 GPUs, 2 x this batch | 8 x 1, padding-free | none | 46,000 |" in render_markdown(report)


def test_benchmark_runs_several_gpus_under_torchrun():
    from medtune.bench.cli import worker_command

    assert worker_command(1) == [sys.executable, "-m", "medtune.bench.worker"]
    assert worker_command(4) == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "4", "-m", "medtune.bench.worker"]


def test_profile_buckets_sort_kernels_by_what_they_do():
    from medtune.bench.perf import profile_buckets

    p = profile_buckets([("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", 3000.0),
                         ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 10000.0),
                         ("void pytorch_flash::flash_bwd_kernel<...>", 2000.0),
                         ("_chunked_cross_entropy_forward", 500.0), ("Memcpy DtoH (Device -> Pinned)", 250.0),
                         ("void multi_tensor_apply_kernel<adam>", 100.0), ("triton_poi_fused_mul_silu_0", 400.0),
                         ("void at::native::elementwise_kernel", 50.0)])
    assert p["buckets"] == {"4-bit dequantization": 3.0, "attention": 2.0, "loss": 0.5, "optimizer": 0.1,
                            "copies between GPU and host": 0.25, "communication": 0.0, "matmuls": 10.0,
                            "fused elementwise (Triton)": 0.4, "other": 0.05}
    assert p["device_ms"] == 16.3 and p["top"][0] == ["nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 10.0]


def bench(*args, env=None):
    env = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    r.message = " ".join(r.stderr.split())  # the error paragraph, unwrapped
    return r


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "bench"
    r = bench("--models", "phi3", "--out", out, "--markdown", tmp_path / "B.md", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    assert "CUDA GPU" in r.message and "train_phi.py --smoke" in r.message and "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "B.md").exists()


def test_bad_options_and_report_only(tmp_path):
    r = bench("--models", "llama", "--steps", "1", "--out", tmp_path)
    assert r.returncode == 2 and f"--models must name some of {', '.join(FAMILIES)}, got llama" in r.message
    assert "--steps must be at least 2" in r.message and "Traceback" not in r.stderr
    r = bench("--report-only", "--out", tmp_path / "nothing")
    assert r.returncode == 2 and "does not exist" in r.message

    (tmp_path / "benchmark.json").write_text(json.dumps(REPORT))
    md = tmp_path / "BENCHMARKS.md"
    r = bench("--report-only", "--out", tmp_path, "--markdown", md)
    assert r.returncode == 0, r.stderr
    assert md.read_text() == render_markdown(REPORT)
    assert "phi3: MFU (4N) 47.8% (target >= 45%): met" in r.stdout and f"Wrote {tmp_path / 'benchmark.json'}" in r.stdout


def test_lengths_from_a_dataset_are_the_training_rows():
    from medtune.bench.cli import dataset_lengths
    from medtune.config import SAMPLE_DATASET

    pairs = dataset_lengths(SAMPLE_DATASET, "phi3", 2048)
    assert len(pairs) == 64
    assert 590 < sum(n for n, _ in pairs) / 64 < 605  # rendered with system prompt and template, as trained
    assert all(0 < p < n for n, p in pairs)
    assert len(dataset_lengths(SAMPLE_DATASET, "mistral", 560)) < 64  # rows over the limit dropped


def test_report_only_keeps_the_sections_other_benchmarks_write(tmp_path):
    (tmp_path / "benchmark.json").write_text(json.dumps(REPORT))
    md = tmp_path / "BENCHMARKS.md"
    evaluation = "\n## Evaluation: generation throughput\n\nWritten by scripts/bench_eval.py.\n"
    md.write_text("# Training benchmarks\n\nAn older training report.\n" + evaluation)
    r = bench("--report-only", "--out", tmp_path, "--markdown", md)
    assert r.returncode == 0, r.stderr
    assert md.read_text() == render_markdown(REPORT) + evaluation


def test_profile_finds_the_lora_products_of_a_real_peft_model():
    """Under torch.profiler with shapes, exactly LoRA's products are picked out: per adapter X @ A and
    XA @ B forward, and backward the gradients of B, XA, A and of the input through A (not for the first
    layer, whose input needs no gradient); the frozen weights' products are not."""
    from peft import LoraConfig, get_peft_model

    from medtune.bench.perf import lora_kernels, lora_matmuls

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]))
    x = torch.randn(10, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        model(x).square().sum().backward()
    picked = lora_matmuls(prof.events(), 4)
    assert len(picked) == 2 * 2 + 4 + 3
    assert all(4 in [d for s in e.input_shapes if len(s) >= 2 for d in s[-2:]] for e in picked)
    products = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    assert len(products) > len(picked)  # the frozen layers' own products and their input gradients
    assert lora_matmuls(prof.events(), None) == [] and lora_kernels(prof.events(), 4) == []  # no kernels on a CPU


def test_profile_buckets_move_lora_kernels_to_their_own_bucket():
    from medtune.bench.perf import LORA_BUCKET, profile_buckets

    kernels = [("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 10000.0), ("void gemv2T_kernel", 700.0)]
    p = profile_buckets(kernels, lora=[("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 1500.0),
                                       ("void gemv2T_kernel", 700.0)])
    assert p["buckets"]["matmuls"] == 8.5 and p["buckets"]["other"] == 0.0 and p["buckets"][LORA_BUCKET] == 2.2
    assert p["device_ms"] == 10.7 and LORA_BUCKET not in profile_buckets(kernels)["buckets"]
