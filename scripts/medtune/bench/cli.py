"""GPU training benchmark: this project's defaults against the Unsloth notebook configuration and a plain
transformers + PEFT QLoRA baseline, all at this project's batch, on full-size random-weight Phi-3-mini /
Mistral-7B built locally; the notebook's own 2 x 4 as a reference row.

    python scripts/benchmark.py                               # both models, all measurements
    python scripts/benchmark.py --models phi3 --steps 15 --out checkpoints/benchmark
    python scripts/benchmark.py --models mistral --skip budget,tuning
    python scripts/benchmark.py --gpus 2 --skip tuning,budget # also the defaults on 2 GPUs (torchrun)

Each measurement runs in its own process (medtune.bench.worker). Results go to OUT/benchmark.json
(models not measured this time are kept from an existing file there) and to BENCHMARKS.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from medtune.config import REPO_ROOT, TrainConfig
from medtune.errors import UserError
from medtune.families import FAMILIES
from medtune.fileio import write_json_atomic
from medtune.bench.perf import medical_o1_lengths, parameter_count, prompt_length, synthetic_rows
from medtune.bench.report import check_targets, render_markdown, summary_table

PARTS = ("compare", "reference", "tuning", "budget", "profile")
# (key, setup, batch): every configuration at this project's batch, and the notebook's own as a reference.
NOTEBOOK_BATCH = {"batch_size": 2, "grad_accum": 4}
COMPARE = [("ours", "ours", None), ("notebook", "notebook", None), ("baseline", "baseline", None),
           ("notebook_2x4", "notebook", NOTEBOOK_BATCH)]
T4_CAP_BYTES = 15 * 10**9  # "15 GB": what Colab shows for a T4
# Length ladders for the longest-sequence search, up to each model's context window.
LADDERS = {"phi3": [2048, 3072, 4096], "mistral": [2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768]}
# Each lever tried on this project's path, against the defaults (measured as (a) of the comparison).
# Packing fills sequences of 2048 tokens with rows of about 900: batch 4 holds about the 8 rows of
# the default batch.
TUNING = [
    ("the previous defaults: Unsloth's offloaded checkpointing, 4-bit weights dequantized at each use", {"gradient_checkpointing": "unsloth"}),
    ("4-bit weights dequantized at each use (no 16-bit copies)", {"dequantize_once": "false"}),
    ("TRL best-fit packing, batch 4 x 2048 tokens", {"packing": True, "batch_size": 4}),
    # medtune/train/lora_add.py: LoRA's sum inside the next compiled kernel instead of Unsloth's addmm.
    ("LoRA's product summed in the compiled kernel after it, not by addmm", {}, {"MEDTUNE_LORA_ADD": "kernel"}),
    ("LoRA's sum by this project's Triton kernel, without addmm's copy", {}, {"MEDTUNE_LORA_ADD": "triton"}),
]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="phi3,mistral", help="comma-separated: phi3, mistral (default: both)")
    p.add_argument("--steps", type=int, default=15, help="measured optimizer steps per configuration (default 15: "
                   "with the warm-up, the 20 steps whose losses are compared)")
    p.add_argument("--gpus", type=int, default=1, help="also train the defaults data-parallel on this many GPUs "
                   "(torchrun, one process per GPU) and report the speed-up over one GPU (default 1: not)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the measurement (default 5, at least 5)")
    p.add_argument("--out", default="checkpoints/benchmark", help="folder for benchmark.json, logs and models")
    p.add_argument("--models-dir", help="where the random-weight 4-bit models are built and kept (default OUT/models)")
    p.add_argument("--skip", default="", help=f"parts to leave out: {', '.join(PARTS)}")
    p.add_argument("--lengths-from", metavar="DATASET",
                   help="draw row lengths from this dataset tokenized as training does (a Hub id or local file) "
                        "instead of the built-in medical-o1 length model")
    p.add_argument("--markdown", default=str(REPO_ROOT / "BENCHMARKS.md"), help="report to (re)write")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite the report from OUT/benchmark.json (no GPU needed)")
    args = p.parse_args(argv)
    problems = []
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in FAMILIES]
    if bad or not args.models:
        problems.append(f"--models must name some of {', '.join(FAMILIES)}, got {', '.join(bad) or 'nothing'}.")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(PARTS):
        problems.append(f"--skip takes {', '.join(PARTS)}, got {', '.join(sorted(args.skip - set(PARTS)))}.")
    if args.steps < 2:
        problems.append(f"--steps must be at least 2, got {args.steps}.")
    if args.gpus < 1:
        problems.append(f"--gpus must be at least 1, got {args.gpus}.")
    if args.warmup < 5:
        problems.append(f"--warmup must be at least 5 (the first steps compile kernels), got {args.warmup}.")
    if problems:
        raise UserError(" ".join(problems))
    return args


def require_gpu():
    import torch

    if torch.cuda.is_available():
        return
    raise UserError("scripts/benchmark.py measures training speed and memory on a CUDA GPU, and this machine has "
                    "none (torch.cuda.is_available() is False). Run it where an NVIDIA GPU is visible, e.g. Colab "
                    "with Runtime > Change runtime type > T4 GPU. To check the training path on a CPU, run "
                    "python scripts/train_phi.py --smoke instead.")


class Runner:
    """Starts each job in its own Python process and keeps its log."""

    def __init__(self, out):
        self.out = out
        self.n = 0

    def __call__(self, job, label, gpus=1, **spec):
        self.n += 1
        stem = self.out / "logs" / f"{self.n:02d}-{label}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        spec_path, result_path, log_path = (stem.with_suffix(s) for s in (".spec.json", ".result.json", ".log"))
        spec_path.write_text(json.dumps({"job": job, **spec}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "scripts"),
                                                                        os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1", "UNSLOTH_SKIP_TORCHVISION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        print(f"  {label} ...", flush=True)
        with log_path.open("w") as log:
            proc = subprocess.Popen([*worker_command(gpus), str(spec_path), str(result_path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in proc.stdout:
                log.write(line)
                if line.startswith("[") or "Error" in line:
                    print("    " + line.rstrip(), flush=True)
            proc.wait()
        took = time.perf_counter() - started
        if proc.returncode or not result_path.is_file():
            tail = log_path.read_text().splitlines()[-15:]
            print(f"    failed after {took:.0f} s (exit {proc.returncode}); log {log_path}:\n      "
                  + "\n      ".join(tail), flush=True)
            return {"error": f"exit {proc.returncode}", "log": str(log_path)}
        result = json.loads(result_path.read_text())
        speed = (f": {result['tokens_per_s']:,.0f} tokens/s, {result['s_per_step']:.2f} s/step, peak reserved "
                 f"{result['peak_reserved_gib']} GiB" if result.get("tokens_per_s") else "")
        print(f"    done in {took:.0f} s{speed}", flush=True)
        return result


def worker_command(gpus):
    """The worker in one process, or under torchrun in one process per GPU of this machine."""
    if gpus == 1:
        return [sys.executable, "-m", "medtune.bench.worker"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
            "-m", "medtune.bench.worker"]


def dataset_lengths(dataset, family, max_len):
    """[(tokens, prompt tokens)] of every row of a dataset rendered and tokenized as training does it,
    with the family's real tokenizer (rows over max_len dropped, as training drops them)."""
    from transformers import AutoTokenizer

    from medtune.train.data import load_rows, to_examples, tokenize_examples
    from medtune.offline_tokenizers import tokenizer_dir
    from medtune.train.trainer import read_system_prompt

    cfg = TrainConfig(dataset=dataset, max_seq_length=max_len)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family))
    fam = FAMILIES[family]
    fam.prepare_tokenizer(tokenizer)
    system_prompt = read_system_prompt(cfg)
    rows, _ = tokenize_examples(to_examples(load_rows(cfg), dataset), tokenizer, fam, cfg, system_prompt)
    if not rows:
        raise UserError(f"--lengths-from {dataset}: no row fits in {max_len} tokens; pass a dataset of training rows.")
    return [(len(r["input_ids"]), sum(1 for x in r["labels"] if x == -100)) for r in rows]


def lengths_for(args, family, n):
    """(lengths, prompt lengths, description) of n training rows."""
    if not args.lengths_from:
        model = medical_o1_lengths(family)
        lengths = model.sample(n, 2048, seed=0)
        return lengths, [prompt_length(x, family) for x in lengths], (
            f"log-normal, mean {model.mean:.0f} tokens, sigma {model.sigma} (medical-o1 length model, "
            "see scripts/medtune/bench/perf.py), rows over 2048 dropped")
    import random

    pairs = dataset_lengths(args.lengths_from, family, 2048)
    rng = random.Random(0)
    drawn = [pairs[rng.randrange(len(pairs))] for _ in range(n)]
    return [a for a, _ in drawn], [b for _, b in drawn], f"drawn from {args.lengths_from} ({len(pairs)} rows tokenized)"


def measure_model(args, run, family, out, results, save):
    fam = FAMILIES[family]
    sizes = fam.full_config
    model_dir = Path(args.models_dir or out / "models").expanduser() / f"{family}-nf4"
    entry = results.setdefault(family, {})
    entry.update(title=fam.title, params=parameter_count(sizes, fam.model_type))
    if "compare" not in args.skip:  # the comparison measured now: its date, and MFU against this run's matmul rate
        entry.update(matmul=run.matmul, measured=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     steps=args.steps)
    if not (model_dir / "config.json").is_file():
        built = run("build", f"{family}-build", family=family, out=str(model_dir))
        if "error" in built:
            entry["error"] = "building the random-weight model failed"
            return
    defaults = TrainConfig()
    batch = {"batch_size": defaults.batch_size, "grad_accum": defaults.grad_accum}
    n_rows = (args.warmup + args.steps + 1) * defaults.batch_size * defaults.grad_accum * args.gpus + 64
    lengths, prompts, described = lengths_for(args, family, n_rows)
    rows_path = out / f"rows-{family}.json"
    rows_path.write_text(json.dumps(synthetic_rows(lengths, sizes["vocab_size"], seed=1, prompt_lengths=prompts)))
    entry["lengths"] = {"description": described, "mean": round(sum(lengths) / len(lengths), 1),
                        "max": max(lengths), "min": min(lengths)}
    common = dict(family=family, model=str(model_dir), rows=str(rows_path), steps=args.steps, warmup=args.warmup,
                  batch=batch)
    if "compare" not in args.skip:
        entry["runs"] = {}
        for key, setup, own_batch in COMPARE:
            if own_batch and "reference" in args.skip:
                continue
            profile = key == "ours" and "profile" not in args.skip
            entry["runs"][key] = run("train", f"{family}-{key}", setup=setup,
                                     **{**common, "batch": own_batch or batch, "profile": profile})
            save()
    if args.gpus > 1:
        entry["scale"] = {"gpus": args.gpus, "run": run("train", f"{family}-ours-{args.gpus}gpu", gpus=args.gpus,
                                                         setup="ours", **common)}
        save()
    if "tuning" not in args.skip:
        entry["tuning"] = []
        for name, overrides, *env in TUNING:  # (what, TrainConfig overrides[, environment of the run])
            env = env[0] if env else {}
            r = run("train", f"{family}-tune", setup="ours", overrides=overrides, env=env, **common)
            entry["tuning"].append({"change": name, "overrides": overrides, **({"env": env} if env else {}), **r})
            save()
    if "budget" not in args.skip:
        measure_budget(run, family, model_dir, sizes, entry, common, defaults, save)


def measure_budget(run, family, model_dir, sizes, entry, common, defaults, save):
    """Under a T4's 15 GB: the defaults at their worst case, then this project and plain Unsloth at
    equal settings on the benchmark's rows."""
    ladder = [x for x in LADDERS[family] if x <= sizes["max_position_embeddings"]]
    entry["budget"] = run("budget", f"{family}-budget", family=family, model=str(model_dir), cap_bytes=T4_CAP_BYTES,
                          ladder=ladder, batches=[],
                          defaults={"batch_size": defaults.batch_size, "grad_accum": defaults.grad_accum,
                                    "max_seq_length": defaults.max_seq_length})
    save()
    entry["capped"] = {}
    for setup in ("ours", "notebook"):
        entry["capped"][setup] = run("train", f"{family}-{setup}-capped", setup=setup, cap_bytes=T4_CAP_BYTES, **common)
        save()


def run_benchmark(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).expanduser()
    json_path = out / "benchmark.json"
    if args.report_only:
        if not json_path.is_file():
            raise UserError(f"--report-only rewrites the report from {json_path}, which does not exist. Pass the "
                            "--out folder of an earlier benchmark run.")
        return write_report(json.loads(json_path.read_text()), json_path, Path(args.markdown), out)
    require_gpu()
    from medtune.train.trainer import versions

    out.mkdir(parents=True, exist_ok=True)
    report = json.loads(json_path.read_text()) if json_path.is_file() else {"models": {}}

    def save():  # after every measurement: a later failure keeps what was measured
        write_json_atomic(json_path, report, indent=1)

    run = Runner(out)
    print(f"Benchmark of {', '.join(args.models)}: {args.warmup} warm-up + {args.steps} measured steps each; "
          f"logs in {out / 'logs'}", flush=True)
    report["matmul"] = run.matmul = run("matmul", "matmul", sizes=[4096, 8192, 16384])
    report.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), versions=versions(),
                  gpu=report["matmul"].get("gpu"), steps=args.steps, warmup=args.warmup)
    for family in args.models:
        print(f"{FAMILIES[family].title}:", flush=True)
        measure_model(args, run, family, out, report["models"], save)
        save()
    return write_report(report, json_path, Path(args.markdown), out)


# Sections of BENCHMARKS.md that other benchmarks write (scripts/bench_eval.py): kept when this one rewrites it.
OTHER_SECTIONS = ("## Evaluation",)


def kept_sections(md):
    """The part of an existing report from the first section another benchmark owns, or ""."""
    text = md.read_text() if md.is_file() else ""
    starts = [text.index("\n" + head) for head in OTHER_SECTIONS if "\n" + head in text]
    return text[min(starts):] if starts else ""


def write_report(report, json_path, md, out):
    md.write_text(render_markdown(report).rstrip("\n") + "\n" + kept_sections(md))
    print("\n" + summary_table(report))
    print("\n".join(check_targets(report)))
    print(f"\nWrote {json_path} (every number), {md} (the report) and {out / 'logs'}/ (one log per process).")
    return report
