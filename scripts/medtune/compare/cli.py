"""Compare two training runs, measured: training speed, peak GPU memory, benchmark accuracy (base and
fine-tuned), answer format, verbosity.

The module behind scripts/compare.py:

    python scripts/evaluate.py checkpoints/phi3-medical --compare-base --mode generate,loglik
    python scripts/evaluate.py checkpoints/mistral-medical --compare-base --mode generate,loglik
    python scripts/compare.py checkpoints/phi3-medical checkpoints/mistral-medical --out reports/phi3-vs-mistral

Reads each run's run_info.json, metrics.jsonl and eval/ (written by evaluate.py; compare.py runs no
model, so a run that was not evaluated gets "not evaluated" and the command that fills it in).
Writes report.md and its charts (loss_curves.png, accuracy.png, speed_memory.png) to --out.
"""
import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from medtune.evaluation.tasks import BENCHMARKS, HELDOUT
from medtune.errors import UserError, parse_options, report_user_errors
from medtune.families import FAMILIES
from medtune.fileio import atomic_dir, read_jsonl
from medtune.runfolder import FOR_REPORT, open_run

ROLES = (("finetuned", "fine-tuned"), ("base", "base"))
REPORT_FILES = {"report.md", "loss_curves.png", "accuracy.png", "speed_memory.png"}
# HuatuoGPT-o1 (Chen et al., 2024, arXiv:2412.18925): MedQA / MedMCQA / PubMedQA accuracy (%)
REFERENCE = [("Llama-3.1-8B-Instruct", 58.7, 56.0, 75.2),
             ("Llama-3.1-8B-Instruct, SFT on medical-o1-reasoning-SFT", 69.0, 57.9, 77.7),
             ("Mistral-7B-Instruct", 48.2, 44.6, 59.5)]


@dataclass
class Run:
    dir: Path
    info: dict
    metrics: list
    summary: dict | None  # eval/summary.json, None when not evaluated

    smoke: bool  # a quickstart run: tiny random-weight model

    @property
    def label(self):
        short = "-".join(FAMILIES[self.info["family"]].title.split("-")[:2])  # Phi-3, Mistral-7B
        return f"{short} ({self.dir.name})"

    def result(self, role, key):
        return ((self.summary or {}).get("results", {}).get(role) or {}).get(key)


def load_run(path):
    run = open_run(path, FOR_REPORT)
    summary_path = run.path / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return Run(run.path, run.info, run.metrics(), summary, run.smoke)


def answer_stats(run, role):
    """Format and length of every generate-mode answer of a model, pooled over the benchmarks."""
    rows = []
    for key, entry in ((run.summary or {}).get("results", {}).get(role) or {}).items():
        if key.endswith("-generate"):
            rows += read_jsonl(run.dir / "eval" / entry["file"])
    if not rows:
        return None
    n = len(rows)
    return {"n": n, "format_ok": sum(r["reasoning_block"] and r["answer"] is not None for r in rows) / n,
            "unparseable": sum(r["answer"] is None for r in rows) / n,
            "median_tokens": statistics.median(r["output_tokens"] for r in rows),
            "median_answer_tokens": statistics.median(r["answer_tokens"] for r in rows)}


def _num(v, spec, suffix="", none="n/a"):
    return none if v is None else f"{format(v, spec)}{suffix}"


def _acc(e, n=True):
    lo, hi = e["ci95"]
    return f"{100 * e['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" + (f" (n={e['n']})" if n else "")


def _duration(seconds):
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def summary_table(runs):
    def per_run(fn):
        return [fn(run) for run in runs]

    def memory(run):
        s = run.info["summary"]
        return _num(s.get("peak_gpu_reserved_gib"), ".2f", " GiB", f"n/a ({run.info.get('device', 'no GPU')})")

    def acc(name):
        def cell(run):
            ft, base = run.result("finetuned", f"{name}-generate"), run.result("base", f"{name}-generate")
            if ft is None:
                return "not evaluated"
            return _acc(ft, n=False) + ("" if base is None else f" vs base {_acc(base, n=False)}") + f" (n={ft['n']})"
        return cell

    def stat(key, spec, scale=1.0, suffix=""):
        def cell(run):
            s = answer_stats(run, "finetuned")
            return "not evaluated" if s is None else _num(s[key] * scale, spec, suffix)
        return cell

    def trained(key, fmt):
        return lambda run: fmt(run.info["summary"].get(key))

    rows = [("faster", "trained tokens/s (steady state)", *per_run(trained("tokens_per_s", lambda v: _num(v, ",.0f")))),
            ("faster", "training wall time", *per_run(trained("wall_time_s", _duration))),
            ("fits a small GPU", "peak GPU memory (reserved)", *per_run(memory)),
            *[("fewer hallucinations", f"{BENCHMARKS[n].title} accuracy: fine-tuned vs base", *per_run(acc(n)))
              for n in BENCHMARKS],
            ("more structured", "format adherence: a reasoning block and a final answer",
             *per_run(stat("format_ok", ".1f", 100, "%"))),
            ("better instruction following", "unparseable final answers",
             *per_run(stat("unparseable", ".1f", 100, "%"))),
            ("concise", "verbosity: median response length (tokens)", *per_run(stat("median_tokens", ",.0f")))]
    return _table(["claim", "measured as", *[r.label for r in runs]], rows)


def training_table(runs):
    def row(name, fn):
        return (name, *[fn(r.info) for r in runs])

    return _table(["", *[r.label for r in runs]], [
        row("base model", lambda i: f"`{i['base_model']}`"),
        row("LoRA targets", lambda i: ", ".join(i.get("lora_targets", []))),
        row("device, dtype", lambda i: f"{i.get('device')}, {i.get('dtype', '').replace('torch.', '')}"),
        row("steps", lambda i: i["summary"]["steps"]),
        row("seconds per step", lambda i: _num(i["summary"].get("s_per_step"), ".3f")),
        row("trained tokens", lambda i: _num(i["summary"].get("trained_tokens"), ",")),
        row("final train loss / held-out loss", lambda i: f"{_num(i['summary'].get('train_loss'), '.4f')} / "
                                                           f"{_num(i['summary'].get('eval_loss'), '.4f')}"),
        row("torch / transformers / unsloth", lambda i: " / ".join(str(i.get("versions", {}).get(k)) for k in
                                                                   ("torch", "transformers", "unsloth"))),
    ])


def benchmark_rows(runs, mode):
    """[(benchmark, [(run index, role, result)])] for the benchmarks evaluated in this mode."""
    rows = []
    for name in BENCHMARKS:
        cells = [(i, role, run.result(role, f"{name}-{mode}")) for i, run in enumerate(runs) for role, _ in ROLES]
        if any(e for _, _, e in cells):
            rows.append((f"{name} ({mode})", [(i, role, e) for i, role, e in cells if e]))
    return rows


def benchmarks_section(runs, heads, by_mode):
    if not any(by_mode.values()):
        return ["Not evaluated yet: run `python scripts/evaluate.py RUN --compare-base --mode generate,loglik` for "
                "each run, then compare again.", ""]
    md = []
    for rows in by_mode.values():
        table = []
        for label, cells in rows:
            found = {(i, role): e for i, role, e in cells}
            table.append((label, *[_acc(found[i, role]) if (i, role) in found else "-"
                                   for i in range(len(runs)) for role, _ in ROLES]))
        if table:
            md += [_table(["benchmark", *heads], table), ""]
    return md + ["generate: the model reasons inside `<think>`, then answers, and the option is read from its "
                 "final answer (unparseable counts as wrong). loglik: the option whose letter (or yes/no/maybe) is "
                 "most likely after the question, as lm-evaluation-harness scores multiple choice. Both in the "
                 "project's chat prompt format (`--prompt-format chat`: the run's chat template and system prompt); "
                 "lm-eval's own plain zero-shot prompts (`--prompt-format lm-eval`) give other numbers, not shown "
                 "here.", "",
                 "![Accuracy](accuracy.png)", ""]


def build(runs, out):
    from medtune.compare import plots

    by_mode = {mode: benchmark_rows(runs, mode) for mode in ("generate", "loglik")}
    plots.loss_curves(runs, out / "loss_curves.png")
    plots.speed_memory_bars(runs, out / "speed_memory.png")
    if any(by_mode.values()):
        plots.accuracy_bars(runs, by_mode["generate"] + by_mode["loglik"], out / "accuracy.png")
    heads = [f"{r.label} {label}" for r in runs for _, label in ROLES]
    md = [f"# {' vs '.join(r.label for r in runs)}: measured", "",
          f"Compared by `scripts/compare.py` on {date.today().isoformat()} from "
          + ", ".join(f"`{r.dir}`" for r in runs) + ". Accuracy is in percent with its 95% Wilson interval; "
          "differences inside overlapping intervals are not evidence of a difference.", ""]
    smoke = [r.dir.name for r in runs if r.smoke]
    if smoke:
        md += [f"> **{', '.join(smoke)}: quickstart (`--smoke`) runs**, tiny random-weight models trained for a few "
               "steps on CPU and evaluated on the bundled samples. These numbers show that the pipeline works; they "
               "say nothing about the real models.", ""]
    md += ["## Summary", "", summary_table(runs), "",
           "Accuracy here is generate mode. Format adherence, unparseable rate and verbosity are pooled over the "
           "fine-tuned models' generate-mode answers.", "",
           "## Training", "", training_table(runs), "", "![Loss curves](loss_curves.png)", "",
           "![Training speed and memory](speed_memory.png)", "", "## Benchmarks", ""]
    md += benchmarks_section(runs, heads, by_mode)
    md += answers_section(runs, heads) + heldout_section(runs, heads) + reference_section()
    return "\n".join(md)


def answers_section(runs, heads):
    stats = [answer_stats(run, role) for run in runs for role, _ in ROLES]
    if not any(stats):
        return []
    cells = [(name, *[("-" if s is None else fn(s)) for s in stats]) for name, fn in [
        ("answers", lambda s: s["n"]),
        ("format adherence", lambda s: f"{100 * s['format_ok']:.1f}%"),
        ("unparseable", lambda s: f"{100 * s['unparseable']:.1f}%"),
        ("median response tokens", lambda s: f"{s['median_tokens']:,.0f}"),
        ("median final-answer tokens", lambda s: f"{s['median_answer_tokens']:,.0f}")]]
    return ["## Answers (generate mode, all benchmarks pooled)", "", _table(["", *heads], cells), "",
            "Format adherence: the response opens with one non-empty `<think>` block and then names one option. "
            "Unparseable: no option can be read from the final answer without guessing.", ""]


def heldout_section(runs, heads):
    entries = [run.result(role, HELDOUT) for run in runs for role, _ in ROLES]
    if not any(entries):
        return []
    row = [("-" if e is None else f"{e['loss']:.4f} / {e['perplexity']:,.1f}") for e in entries]
    return ["## Held-out loss", "", _table(["", *heads], [("loss / perplexity on the answer tokens", *row)]), "",
            "Per token of each family's own tokenizer, so the families' values are not directly comparable: compare "
            "each fine-tuned model with its base.", ""]


def reference_section():
    return ["## Published reference numbers", "",
            "For context only, from the HuatuoGPT-o1 paper (Chen et al. 2024, arXiv:2412.18925), with its own prompts "
            "and evaluation sets:", "",
            _table(["model", "MedQA", "MedMCQA", "PubMedQA"],
                   [(model, *[f"{v:.1f}" for v in values]) for model, *values in REFERENCE]), ""]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/compare.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs=2, metavar="RUN",
                   help="two run folders, e.g. checkpoints/phi3-medical checkpoints/mistral-medical")
    p.add_argument("--out", help="report folder (default: reports/<run1>-vs-<run2>)")
    args = parse_options(p, argv)
    return args


def compare(args):
    runs = [load_run(path) for path in args.runs]
    out = Path(args.out or Path("reports", f"{runs[0].dir.name}-vs-{runs[1].dir.name}"))
    if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - REPORT_FILES):
        raise UserError(f"{out} exists and holds more than an earlier report, which compare.py would replace. Pass "
                        "a new folder with --out.")
    for run in runs:
        if run.summary is None:
            print(f"warning: {run.dir} has no eval/summary.json; its benchmark rows say 'not evaluated'. Run "
                  f"`python scripts/evaluate.py {run.dir} --compare-base --mode generate,loglik` first.",
                  file=sys.stderr)
    with atomic_dir(out, replace=True) as tmp:  # an earlier report (checked above) is replaced whole
        (tmp / "report.md").write_text(build(runs, tmp))
    print(f"Wrote {out}/:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:18s} {'the report (GitHub markdown)' if path.suffix == '.md' else 'chart'}")
    return out


@report_user_errors
def main(argv=None):
    compare(parse_args(sys.argv[1:] if argv is None else argv))
