"""The benchmark's report: tables, targets and BENCHMARKS.md, from benchmark.json's content.

    python scripts/benchmark.py --report-only --out checkpoints/benchmark   # rewrite BENCHMARKS.md
"""
from medtune.bench.perf import hardware_flops_per_token, loss_difference, model_flops_per_token, recomputes
from medtune.bench.step_notes import SHORT, collections_note, compiled_note, profile_table

LABELS = {"ours": "(a) this project, defaults", "notebook": "(b) Unsloth notebook config, this project's batch",
          "baseline": "(c) transformers + PEFT QLoRA, this project's batch",
          "notebook_2x4": "reference: Unsloth notebook config as published"}
TARGETS = {"speed_vs_notebook": 1.4, "speed_vs_baseline": 5.0, "mfu": 0.45, "loss_difference": 0.01,
           "capped_vs_notebook": 0.97, "scale": 1.85}
CHECKPOINTING = {"false": "none", "unsloth": "Unsloth (offloaded)", "true": "recompute", None: "n/a"}


def measured(run):
    """Whether a run finished with a speed (a failed one holds an error and its log instead)."""
    return bool(run and "error" not in run and run.get("tokens_per_s"))


def _rate(entry, report):
    return (entry.get("matmul") or report.get("matmul") or {}).get("flops_per_s")


def mfus(entry, run, report):
    """(MFU counting 4N model FLOPs per token, MFU counting what the GPU does: 6N where checkpointing
    recomputes the forward); Nones when not measured."""
    rate = _rate(entry, report)
    if not (rate and measured(run)):
        return None, None
    model = model_flops_per_token(entry["params"]) * run["tokens_per_s"] / rate
    hardware = hardware_flops_per_token(entry["params"], recomputes(run.get("gradient_checkpointing")))
    return model, hardware * run["tokens_per_s"] / rate


def _fmt(v, spec, unit=""):
    return "n/a" if v is None else f"{format(v, spec)}{unit}"


HEADER = ("| configuration | batch | checkpointing | trained tokens/s | s/step | peak allocated GiB | peak reserved GiB "
          "| MFU (4N) | MFU (hardware) | LoRA trainable params |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def run_row(name, entry, run, report):
    if not measured(run):
        return f"| {name} | failed: see {run.get('log', 'the log') if run else 'the log'} | | | | | | | | |"
    m4, mhw = mfus(entry, run, report)
    layout = "padding-free" if run.get("padding_free") else ("packed" if run.get("packing") else "padded")
    layout += f", at most {run['micro_batch_token_cap']:,} tokens a micro-batch" if run.get("micro_batch_token_cap") else ""
    return (f"| {name} | {run['batch_size']} x {run['grad_accum']}, {layout} | "
            f"{CHECKPOINTING.get(run.get('gradient_checkpointing'), run.get('gradient_checkpointing'))} | "
            f"{run['tokens_per_s']:,.0f} | {run['s_per_step']:.2f} | {_fmt(run['peak_allocated_gib'], '.2f')} | "
            f"{_fmt(run['peak_reserved_gib'], '.2f')} | {_fmt(m4, '.1%')} | {_fmt(mhw, '.1%')} | "
            f"{run['trainable_params']:,} ({run['lora_modules']} modules) |")


def _speed(a, b):
    return a["tokens_per_s"] / b["tokens_per_s"] if measured(a) and measured(b) else None


def ratios(entry):
    runs = entry.get("runs", {})
    tuning = {t["change"]: t for t in entry.get("tuning") or []}
    # The loss check's reference: this project's path with Unsloth's checkpointing (the previous default)
    # where that lever was run, else (b), the same training (rows, seed, LoRA, optimizer, schedule) through
    # the notebooks' code with Unsloth's checkpointing.
    unsloth_gc = next((t for t in tuning.values() if t.get("overrides") == {"gradient_checkpointing": "unsloth"}), None)
    capped = entry.get("capped") or {}
    out = {"speed_vs_notebook": _speed(runs.get("ours"), runs.get("notebook")),
           "speed_vs_baseline": _speed(runs.get("ours"), runs.get("baseline")),
           "speed_vs_notebook_as_published": _speed(runs.get("ours"), runs.get("notebook_2x4")),
           "loss_difference": loss_difference((runs.get("ours") or {}).get("losses"),
                                              (unsloth_gc or runs.get("notebook") or {}).get("losses")),
           "capped_vs_notebook": _speed(capped.get("ours"), capped.get("notebook")),
           "scale": _speed((entry.get("scale") or {}).get("run"), runs.get("ours"))}
    return {k: v for k, v in out.items() if v is not None}


# Families FastLanguageModel hands to FastModel (transformers' modeling, compiled per block), as
# this project's training loads every family; for the others it swaps in Unsloth's own forwards.
SAME_LOADER = ("phi3", "gemma3")
# How compiled blocks add LoRA's product where not by Unsloth's addmm (medtune/train/lora_add.py).
LORA_ADD = {"kernel": "summed in the kernel after it", "triton": "added by a Triton kernel without the copy"}
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}


def where_gains_come_from(entry, family=None):
    """One sentence: what differs between (a) and each configuration at the same batch."""
    runs = entry.get("runs", {})
    ours, nb, base = (runs.get(k) for k in ("ours", "notebook", "baseline"))
    if not measured(ours):
        return ""
    parts = []
    if measured(nb):
        differences = [f"gradient checkpointing ({CHECKPOINTING[ours.get('gradient_checkpointing')]} against "
                       f"{CHECKPOINTING[nb.get('gradient_checkpointing')]}), chosen from the GPU's free memory"]
        if (ours["batch_size"], ours["grad_accum"]) != (nb["batch_size"], nb["grad_accum"]):
            differences.append(f"the micro-batch ({ours['batch_size']} x grad-accum {ours['grad_accum']} against "
                               f"{nb['batch_size']} x {nb['grad_accum']}, the same rows per optimizer step, so that "
                               "every activation fits), also chosen from free memory")
        if ours.get("dequantized_once"):
            differences.append("the frozen weights (16-bit copies dequantized once at load, against the 4-bit weights "
                               "dequantized by bitsandbytes in every forward and backward), also chosen from free memory")
        if ours.get("lora_add") in LORA_ADD:
            differences.append(f"LoRA's sum (the product {LORA_ADD[ours['lora_add']]}, against Unsloth's addmm, "
                               "which first copies the frozen product)")
        if family not in SAME_LOADER:
            differences.append("the loader (this project loads through Unsloth's FastModel, whose per-block compiled "
                               "code attends over packed rows with varlen attention; the notebook's FastLanguageModel "
                               "swaps in Unsloth's own forwards for this family, which run each block eagerly and "
                               "attend segment by segment)")
        parts.append(f"against (b) the only difference is {differences[0]}" if len(differences) == 1 else
                     f"against (b) {NUMBERS[len(differences)]} differences: " + "; ".join(differences))
    if measured(base):
        parts.append("against (c) Unsloth's kernels and padding-free batches (the baseline pads each batch to its "
                     "longest row and recomputes with Hugging Face checkpointing) add to that")
    return ("Where the gains come from, at the same batch, rows, length and LoRA: " + "; ".join(parts) + ".") if parts else ""


TARGET_CHECKS = [("speed vs notebook config at equal batch", "speed_vs_notebook", ">=", "x"),
                 ("speed vs transformers + PEFT at equal batch", "speed_vs_baseline", ">=", "x"),
                 ("first 20 losses vs the same training with Unsloth's checkpointing, largest difference",
                  "loss_difference", "<=", "%"),
                 ("under the 15 GB cap, speed vs notebook config", "capped_vs_notebook", ">=", "x"),
                 ("speed-up on more GPUs", "scale", ">=", "x")]


def check_targets(report):
    """One line per target and model: measured value, target, met or not."""
    lines = []
    for family, entry in report.get("models", {}).items():
        r = ratios(entry)
        r["mfu"] = mfus(entry, entry.get("runs", {}).get("ours"), report)[0]
        for name, key, op, unit in TARGET_CHECKS[:2] + [("MFU (4N)", "mfu", ">=", "%")] + TARGET_CHECKS[2:]:
            value, target = r.get(key), TARGETS[key]
            if value is None:
                if key != "scale":
                    lines.append(f"{family}: {name}: not measured")
                continue
            met = value >= target if op == ">=" else value <= target
            digits = ".2%" if key == "loss_difference" else ".1%"
            shown, goal = ((format(value, digits), f"{target:.0%}") if unit == "%" else (f"{value:.2f}x", f"{target:g}x"))
            lines.append(f"{family}: {name} {shown} (target {op} {goal}): {'met' if met else 'NOT met'}")
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
    base = entry.get("runs", {}).get("ours")
    chosen = CHECKPOINTING.get((base or {}).get("gradient_checkpointing"), "?") + " checkpointing"
    chosen += ", 16-bit copies of the 4-bit weights" if (base or {}).get("dequantized_once") else ""
    chosen += f", LoRA's product {LORA_ADD[(base or {}).get('lora_add')]}" if (base or {}).get("lora_add") in LORA_ADD else ""
    rows = [(f"defaults: {chosen} (auto)", base)] + [(t["change"], t) for t in entry.get("tuning") or []]
    lines = ["| change (each a run of this project's path) | trained tokens/s | vs defaults | s/step | peak reserved GiB | "
             "MFU (4N) | MFU (hardware) | first 20 losses vs defaults |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in rows:
        if not measured(t):
            lines.append(f"| {name} | failed: see {(t or {}).get('log')} | | | | | | |")
            continue
        m4, mhw = mfus(entry, t, report)
        diff = loss_difference(t.get("losses"), base.get("losses")) if t is not base and measured(base) else None
        same_rows = not t.get("packing")  # packed batches hold other rows: their losses are not comparable
        lines.append(f"| {name} | {t['tokens_per_s']:,.0f} | {_fmt(_speed(t, base), '.2f', 'x')} | {t['s_per_step']:.2f} | "
                     f"{_fmt(t['peak_reserved_gib'], '.2f')} | {_fmt(m4, '.1%')} | {_fmt(mhw, '.1%')} | "
                     f"{_fmt(diff, '.2%') if same_rows else 'other batches'} |")
    return "\n".join(lines)


def budget_table(entry):
    b = entry.get("budget")
    if "error" in b:
        return f"The budget run failed: see {b.get('log')}."
    lines = [f"Cap: {b['cap_gib']} GiB (torch.cuda.set_per_process_memory_fraction), every row at the length tried; "
             f"gradient checkpointing chosen under the cap: {CHECKPOINTING.get(b.get('gradient_checkpointing'), '?')}.",
             "", "| check | batch | sequence length | fits | peak reserved GiB |", "|---|---|---:|---|---:|"]
    for t in b["tries"]:
        lines.append(f"| {t['check']} | {t['batch_size']} x {t['grad_accum']} | {t['length']} | "
                     f"{'yes' if t['fits'] else 'no (out of memory)'} | {_fmt(t['peak_reserved_gib'], '.2f')} |")
    lines += ["", f"Defaults fit: {'yes' if b['defaults_fit'] else 'NO'}."]
    capped = entry.get("capped") or {}
    if capped:
        lines += ["", "Speed under the same cap, on the benchmark's rows:", "", HEADER]
        lines += [run_row(LABELS[k], entry, capped[k], {}) for k in ("ours", "notebook") if k in capped]
    return "\n".join(lines)


def measured_steps(entry):
    return f", over {entry['steps']} measured steps" if entry.get("steps") else ""


def model_section(family, entry, report):
    rate = (entry.get("matmul") or {}).get("flops_per_s")
    lengths = entry.get("lengths") or {}
    out = [f"## {entry.get('title', family)}", "", f"{entry.get('params', 0) / 1e9:.2f}B parameters. Row lengths: "
           f"{lengths.get('description')}, mean {lengths.get('mean')}. Speeds measured {entry.get('measured', report.get('date'))}"
           f"{measured_steps(entry)}"
           f"{f' (matmul rate that run: {rate / 1e12:.0f} TFLOP/s)' if rate else ''}.", ""]
    if entry.get("runs"):
        out += [HEADER] + [run_row(name, entry, entry["runs"][k], report) for k, name in LABELS.items()
                           if k in entry["runs"]] + [""]
        r = ratios(entry)
        shown = {k: v for k, v in r.items() if k.startswith("speed")}
        if shown:
            out += ["Speed of (a) against: " + ", ".join(f"{k.replace('speed_vs_', '').replace('_', ' ')} {v:.2f}x"
                                                        for k, v in shown.items()) + ". " + where_gains_come_from(entry, family), ""]
        for note in (compiled_note(entry), collections_note(entry, report.get("warmup", 5))):
            out += [note, ""] if note else []
        if profile_table(entry["runs"].get("ours")):
            out += ["### Where a step's time goes", "", profile_table(entry["runs"]["ours"]), ""]
    if entry.get("tuning"):
        out += ["### Levers tried", "", tuning_table(entry, report), ""]
    scale = entry.get("scale")
    if scale:
        out += [f"### {scale['gpus']} GPUs (torchrun)", "", HEADER,
                run_row(f"(a) on {scale['gpus']} GPUs, {scale['gpus']} x this batch", entry, scale["run"], report), ""]
    if entry.get("budget"):
        out += ["### T4 memory budget (15 GB)", "", budget_table(entry), ""]
    return out


def render_markdown(report):
    rate, v = report.get("matmul") or {}, report.get("versions") or {}
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes") if v.get(k))
    out = [
        "# Training benchmarks",
        "",
        "Written by `python scripts/benchmark.py` (see the README's Measured section). Random-weight models of the real "
        "architectures, built locally and loaded in 4-bit NF4; the same token rows, micro-batch, gradient accumulation "
        "and maximum length (2048) for every configuration, this project's defaults, except the reference row at the "
        "notebook's own 2 x 4 and (a) where `--gradient-checkpointing auto` keeps every activation by capping a "
        "micro-batch's tokens, a longer micro-batch training in parts of whole rows (the table's batch column says so); "
        f"{report.get('warmup')} warm-up steps left out, {report.get('steps')} steps measured unless a model's section "
        "says otherwise; each configuration in its own process.",
        "",
        f"- Date: {report.get('date')}",
        f"- GPU: {report.get('gpu')}; measured bf16 matrix-multiply rate {rate.get('flops_per_s', 0) / 1e12:.0f} TFLOP/s "
        f"(best of square sizes {rate.get('by_size')})",
        f"- Libraries: {libs}",
        "- MFU (4N) = 4 x parameters x trained tokens/s / measured bf16 matmul rate: a forward (2N) and the input "
        "gradients through the frozen weights (2N). MFU (hardware) counts what the GPU does: 6N where gradient "
        "checkpointing recomputes the forward. Parameters: every weight of the architecture.",
        "- Trained tokens: non-pad tokens of the batches (`include_num_input_tokens_seen=\"non_padding\"`).",
        "",
    ]
    if report.get("commands"):
        out += ["Measured by these runs, one after the other on the same kind of machine (runs of different "
                "starts of the machine can differ by a few percent: see the notes):", ""]
        out += [f"- `{c}`" if "(" not in c else f"- `{c[:c.index(' (')]}` {c[c.index(' (') + 1:]}"
                for c in report["commands"]] + [""]
    for family, entry in report.get("models", {}).items():
        out += model_section(family, entry, report)
    out += ["## Targets", ""] + [f"- {line}" for line in check_targets(report)] + [""]
    if report.get("notes"):
        out += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(out)
