"""The benchmark's report: tables, targets and BENCHMARKS.md, from benchmark.json's content."""
from medtune.bench.perf import mfu

LABELS = {"ours": "(a) this project, defaults", "baseline": "(b) transformers + PEFT QLoRA",
          "notebook": "(c) Unsloth notebook config"}
TARGETS = {"speed_vs_baseline": 2.5, "speed_vs_notebook": 1.2, "reserved_vs_baseline": 0.45, "mfu": 0.30}


def measured(run):
    """Whether a run finished with a speed (a failed one holds an error and its log instead)."""
    return bool(run and "error" not in run and run.get("tokens_per_s"))


def _mfu(entry, run, report):
    rate = (entry.get("matmul") or report.get("matmul") or {}).get("flops_per_s")
    return mfu(entry["params"], run["tokens_per_s"], rate) if rate and measured(run) else None


def _fmt(v, spec, unit=""):
    return "n/a" if v is None else f"{format(v, spec)}{unit}"


def run_row(name, entry, run, report):
    if not measured(run):
        return f"| {name} | failed: see {run.get('log', 'the log') if run else 'the log'} | | | | | | |"
    return (f"| {name} | {run['tokens_per_s']:,.0f} | {run['s_per_step']:.2f} | {_fmt(run['peak_allocated_gib'], '.2f')} | "
            f"{_fmt(run['peak_reserved_gib'], '.2f')} | {_fmt(_mfu(entry, run, report), '.1%')} | "
            f"{run['trainable_params']:,} ({run['lora_modules']} modules) | {run['batch_size']} x {run['grad_accum']}"
            f"{', padding-free' if run.get('padding_free') else ', padded'} |")


HEADER = ("| configuration | trained tokens/s | s/step | peak allocated GiB | peak reserved GiB | MFU | "
          "LoRA trainable params | batch |\n|---|---:|---:|---:|---:|---:|---:|---|")


def ratios(entry):
    runs = entry.get("runs", {})
    ours, base, nb = (runs.get(k) for k in ("ours", "baseline", "notebook"))
    out = {}
    if measured(ours) and measured(base):
        out["speed_vs_baseline"] = ours["tokens_per_s"] / base["tokens_per_s"]
        if ours["peak_reserved_gib"] and base["peak_reserved_gib"]:
            out["reserved_vs_baseline"] = ours["peak_reserved_gib"] / base["peak_reserved_gib"]
    if measured(ours) and measured(nb):
        out["speed_vs_notebook"] = ours["tokens_per_s"] / nb["tokens_per_s"]
    return out


def check_targets(report):
    """One line per target and model: measured value, target, met or not."""
    lines = []
    for family, entry in report.get("models", {}).items():
        r = ratios(entry)
        ours = entry.get("runs", {}).get("ours")
        m = _mfu(entry, ours, report) if ours else None
        checks = [("speed vs baseline", r.get("speed_vs_baseline"), ">=", TARGETS["speed_vs_baseline"], "x"),
                  ("speed vs notebook config", r.get("speed_vs_notebook"), ">=", TARGETS["speed_vs_notebook"], "x"),
                  ("peak reserved vs baseline", r.get("reserved_vs_baseline"), "<=", TARGETS["reserved_vs_baseline"], "x"),
                  ("MFU", m, ">=", TARGETS["mfu"], "")]
        for name, value, op, target, unit in checks:
            if value is None:
                lines.append(f"{family}: {name}: not measured")
                continue
            met = value >= target if op == ">=" else value <= target
            shown = f"{value:.1%}" if name == "MFU" else f"{value:.2f}{unit}"
            lines.append(f"{family}: {name} {shown} (target {op} {target:g}{unit}): {'met' if met else 'NOT met'}")
        trainable = [run.get("trainable_params") for run in entry.get("runs", {}).values() if measured(run)]
        if len(set(trainable)) > 1:
            lines.append(f"{family}: LoRA trainable parameters differ between configurations: {trainable}: NOT comparable")
        budget = entry.get("budget")
        if budget and "error" not in budget:
            lines.append(f"{family}: defaults within {budget['cap_gib']} GiB: {'met' if budget['defaults_fit'] else 'NOT met'}")
    return lines


def summary_table(report):
    parts = []
    for family, entry in report.get("models", {}).items():
        parts.append(f"{entry.get('title', family)} ({entry.get('params', 0) / 1e9:.2f}B parameters)\n{HEADER}")
        for key, name in LABELS.items():
            if key in entry.get("runs", {}):
                parts.append(run_row(name, entry, entry["runs"][key], report))
    return "\n".join(parts)


def tuning_table(entry, report):
    tuning = entry.get("tuning") or []
    if not tuning:
        return ""
    base = tuning[0] if measured(tuning[0]) else None
    lines = ["| change (each run of this project's path) | trained tokens/s | vs previous default | s/step | "
             "peak reserved GiB | MFU |", "|---|---:|---:|---:|---:|---:|"]
    for t in tuning:
        if not measured(t):
            lines.append(f"| {t['change']} | failed: see {t.get('log')} | | | | |")
            continue
        vs = f"{t['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
        lines.append(f"| {t['change']} | {t['tokens_per_s']:,.0f} | {vs} | {t['s_per_step']:.2f} | "
                     f"{_fmt(t['peak_reserved_gib'], '.2f')} | {_fmt(_mfu(entry, t, report), '.1%')} |")
    return "\n".join(lines)


def budget_table(entry):
    b = entry.get("budget")
    if not b:
        return ""
    if "error" in b:
        return f"The budget run failed: see {b.get('log')}."
    lines = [f"Cap: {b['cap_gib']} GiB (torch.cuda.set_per_process_memory_fraction), every row at the length tried.",
             "", "| check | batch | sequence length | fits | peak reserved GiB |", "|---|---|---:|---|---:|"]
    for t in b["tries"]:
        lines.append(f"| {t['check']} | {t['batch_size']} x {t['grad_accum']} | {t['length']} | "
                     f"{'yes' if t['fits'] else 'no (out of memory)'} | {_fmt(t['peak_reserved_gib'], '.2f')} |")
    lines.append("")
    lines.append(f"Defaults fit: {'yes' if b['defaults_fit'] else 'NO'}. Longest length that fits: batch 1: "
                 f"{b.get('longest_batch_1') or 'none tried fit'}, batch 2: {b.get('longest_batch_2') or 'none tried fit'} "
                 "(largest of the lengths tried, up to the model's context window).")
    return "\n".join(lines)


def render_markdown(report):
    rate = report.get("matmul") or {}
    v = report.get("versions") or {}
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes") if v.get(k))
    out = [
        "# Training benchmarks",
        "",
        "Written by `python scripts/benchmark.py` (see the README's Benchmarks section). Random-weight models of "
        "the real architectures, built locally and loaded in 4-bit NF4; the same token rows, effective batch of 8 "
        f"sequences and maximum length 2048 for every configuration; {report.get('warmup')} warm-up steps left out, "
        f"{report.get('steps')} steps measured; each configuration in its own process.",
        "",
        f"- Date: {report.get('date')}",
        f"- GPU: {report.get('gpu')}; measured bf16 matrix-multiply rate {rate.get('flops_per_s', 0) / 1e12:.0f} TFLOP/s "
        f"(best of square sizes {rate.get('by_size')})",
        f"- Libraries: {libs}",
        "- MFU = 4 x parameters x trained tokens/s / measured bf16 matmul rate. 4N: a forward (2N) and the input "
        "gradients through the frozen weights (2N); LoRA has no weight gradients of its own worth counting, and "
        "recomputation by gradient checkpointing is not counted. Parameters: every weight of the architecture.",
        "- Trained tokens: non-pad tokens of the batches (`include_num_input_tokens_seen=\"non_padding\"`).",
        "",
    ]
    for family, entry in report.get("models", {}).items():
        rate = (entry.get("matmul") or {}).get("flops_per_s")
        out += [f"## {entry.get('title', family)}", "", f"{entry.get('params', 0) / 1e9:.2f}B parameters. Row lengths: "
                f"{(entry.get('lengths') or {}).get('description')}, mean {(entry.get('lengths') or {}).get('mean')}. "
                f"Speeds measured {entry.get('measured', report.get('date'))}"
                f"{f' (matmul rate that run: {rate / 1e12:.0f} TFLOP/s)' if rate else ''}.", ""]
        if entry.get("runs"):
            out += [HEADER] + [run_row(name, entry, entry["runs"][k], report) for k, name in LABELS.items()
                               if k in entry["runs"]] + [""]
            r = ratios(entry)
            if r:
                out += ["Ratios: " + ", ".join(f"{k.replace('_', ' ')} {val:.2f}x" for k, val in r.items()), ""]
        if entry.get("tuning"):
            out += ["### Tuning the defaults", "", tuning_table(entry, report), ""]
        if entry.get("budget"):
            out += ["### T4 memory budget (15 GB)", "", budget_table(entry), ""]
    out += ["## Targets", ""] + [f"- {line}" for line in check_targets(report)] + [""]
    return "\n".join(out)
