"""Evaluate a fine-tuned run, its export or a Hub model on MedQA, MedMCQA and PubMedQA, and the run
on its held-out split.

The module behind scripts/evaluate.py:

    python scripts/evaluate.py checkpoints/phi3-medical --compare-base            # Hub benchmarks, GPU
    python scripts/evaluate.py checkpoints/phi3-medical --mode loglik --limit 500
    python scripts/evaluate.py checkpoints/phi3-smoke --offline --max-new-tokens 32   # bundled samples, CPU
    python scripts/evaluate.py microsoft/Phi-3-mini-4k-instruct --benchmarks medqa --limit 200

Writes, under --out (default <run>/eval/): <benchmark>-<mode>.jsonl, one line per item (prompt, raw
output, extracted answer, gold, correct); heldout-loss.jsonl; the same under base/ with
--compare-base; summary.json. Prints accuracy with 95% Wilson intervals. Items already in a JSONL
file are not evaluated again, so an interrupted evaluation continues where it stopped.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from medtune.evaluation.tasks import BENCHMARKS, HELDOUT, PROMPT_FORMATS, VALID, heldout_rows, load_items, parse_names
from medtune import noise
from medtune.errors import UserError, parse_options, report_user_errors
from medtune.fileio import write_json_atomic

MODES = ("generate", "loglik")
ENGINES = ("compiled", "continuous", "static")  # medtune.evaluation.generation
DEFAULT_SEED = 1234


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/evaluate.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("source", help="run folder (checkpoints/NAME), its export (checkpoints/NAME/export), a model folder "
                                  "or a Hugging Face Hub id")
    p.add_argument("--benchmarks", help=f"comma-separated, of {', '.join(VALID)} (default: all of them; heldout only "
                                        "for a run or its export)")
    p.add_argument("--mode",
                   help="generate: the model reasons in <think>, then answers, and the option is read from its text; "
                        "loglik: each option's log-likelihood after the question, as lm-evaluation-harness scores "
                        "multiple choice; generate,loglik: both (default: generate; loglik with --prompt-format "
                        "lm-eval)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="chat",
                   help="chat: the project's prompts in the model's chat template with its system prompt (the "
                        "default, what scripts/compare.py reports); lm-eval: lm-evaluation-harness's own zero-shot "
                        "tasks medqa_4options, medmcqa and pubmedqa (plain text, their datasets, PubMedQA's 500-item "
                        "test fold), scored by log-likelihood as lm-eval scores them, to set beside published lm-eval "
                        "numbers")
    p.add_argument("--limit", type=int, help="evaluate a seeded random sample of N items per benchmark")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the --limit sample (default {DEFAULT_SEED})")
    p.add_argument("--compare-base", action="store_true",
                   help="also evaluate the base model (the run's base without the adapter) and print both")
    p.add_argument("--offline", action="store_true",
                   help="use the samples in data/eval/ instead of the Hub datasets (no network needed)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=FILE",
                   help="a local .jsonl/.json/.csv/.parquet file for one benchmark, in the Hub dataset's columns; "
                        "repeatable")
    p.add_argument("--out", help="output folder (default: <run>/eval, <run>/export/eval, or reports/eval/<model>)")
    p.add_argument("--engine", choices=ENGINES, default="compiled",
                   help="generate mode: compiled (batches as large as the GPU holds, a static cache and a decode step "
                        "compiled once into CUDA graphs), continuous (transformers' continuous batching) or static "
                        "(model.generate over batches of --batch-size prompts, the weights as stored). compiled and "
                        "continuous unpack 4-bit weights to 16 bits where they fit the GPU; the answers are the same "
                        "(default: compiled)")
    p.add_argument("--batch-size", type=int,
                   help="prompts per forward pass in loglik mode, the held-out loss and --engine static (default 8); "
                        "with --engine compiled or continuous, the most rows generated at once (default: as many as "
                        "the GPU's memory holds)")
    p.add_argument("--verbose", action="store_true",
                   help="show third-party warnings and library output here instead of in the log file")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="generate mode: most tokens of reasoning and answer; a response cut off inside <think> counts "
                        "as unparseable (default 1024)")
    problems = []
    args = parse_options(p, argv, problems)
    problems += _check_modes(args)
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    args.files = {}
    for spec in args.data:
        name, _, path = spec.partition("=")
        if name.strip() not in BENCHMARKS or not path.strip():
            problems.append(f"--data {spec!r} must be NAME=FILE with NAME one of {', '.join(BENCHMARKS)}.")
        else:
            args.files[name.strip()] = path.strip()
    if problems:
        raise UserError(" ".join(problems))
    return args


def _check_modes(args):
    problems = []
    lm_eval = args.prompt_format == "lm-eval"
    args.mode = args.mode or ("loglik" if lm_eval else "generate")
    args.modes = list(dict.fromkeys(m.strip() for m in args.mode.split(",") if m.strip()))
    if not args.modes or any(m not in MODES for m in args.modes):
        problems.append(f"--mode {args.mode!r} is not one of generate, loglik (or both: generate,loglik).")
    elif lm_eval and "generate" in args.modes:
        problems.append("--prompt-format lm-eval scores by log-likelihood only, as lm-evaluation-harness scores these "
                        "tasks: use --mode loglik (the default with it), or drop --prompt-format for generate mode.")
    return problems


@dataclass
class Task:
    """One results file: a benchmark in one mode (or the held-out loss) for one model."""
    name: str
    mode: str  # generate, loglik or loss
    role: str  # finetuned, base or model
    prompt_format: str  # chat or lm-eval
    path: Path
    setup: dict  # how its rows were computed: resumed rows must match
    done: dict  # id -> stored row

    @property
    def key(self):
        if self.mode == "loss":
            return self.name
        return f"{self.name}-lm-eval" if self.prompt_format == "lm-eval" else f"{self.name}-{self.mode}"


def stored_rows(path, setup):
    """Rows already in `path`, by id. A torn last line (a run killed mid-write) is dropped."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    rows = {}
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):
                raise UserError(f"{path} line {n} is not valid JSON, so its results can't be resumed. Delete the file "
                                "to evaluate those items again.") from None
            path.write_text("".join(f"{kept}\n" for kept in lines[:-1]))
            break
        if row.get("setup") != setup:
            raise UserError(f"{path} holds results computed with other settings ({row.get('setup')}; now {setup}). "
                            "Pass another --out, or delete the file to evaluate again with the new settings.")
        rows[row["id"]] = row
    return rows


def read_summary(out, model):
    path = out / "summary.json"
    if not path.is_file():
        return {"model": model, "results": {}}
    summary = json.loads(path.read_text())
    if summary["model"]["identity"] != model["identity"]:
        raise UserError(f"{out} holds the evaluation of another model ({summary['model']['identity']}). Pass another "
                        "--out for this one.")
    return {**summary, "model": model}


def plan(args):
    """Everything that can be checked before a model is loaded or a file written."""
    from medtune.evaluation import models as em

    source = em.resolve(args.source)
    lm_eval = args.prompt_format == "lm-eval"
    heldout = [HELDOUT] if source.run_dir and not lm_eval else []  # a loss, the same in either format
    names = parse_names(args.benchmarks) if args.benchmarks else [*BENCHMARKS, *heldout]
    if HELDOUT in names and not source.run_dir:
        raise UserError(f"heldout needs a run folder (its heldout.jsonl), and {args.source} is a model without one. "
                        f"Drop heldout from --benchmarks, or evaluate the run folder.")
    if args.compare_base and not source.base:
        raise UserError(f"--compare-base needs a run folder or its export (run_info.json names the base model); "
                        f"{args.source} has no known base. Evaluate the base model on its own instead.")
    unused = sorted(set(args.files) - set(names))
    if unused:
        raise UserError(f"--data names {', '.join(unused)}, which --benchmarks does not include.")
    tokenizer = em.load_tokenizer(source, chat=not lm_eval or HELDOUT in names)
    data = {}
    for name in names:
        if name == HELDOUT:
            # named without its folder: results stay resumable when the run folder moves
            data[name] = (heldout_rows(source.run_dir), "the run's heldout.jsonl")
        else:
            bench = PROMPT_FORMATS[args.prompt_format][name]
            data[name] = load_items(bench, args.files.get(name), args.offline, args.limit, args.seed)
    out = Path(args.out) if args.out else source.default_out
    model = em.describe(source)
    summary = read_summary(out, model)
    roles = ["finetuned" if source.kind in ("run", "export") else "model", *(["base"] if args.compare_base else [])]
    tasks = []
    for role in roles:
        folder = out / "base" if role == "base" else out
        who = source.identity + (" (base)" if role == "base" else "")
        for name in names:
            for mode in ["loss"] if name == HELDOUT else args.modes:
                setup = {"model": who, "data": data[name][1], **({"max_new_tokens": args.max_new_tokens}
                                                                 if mode == "generate" else {})}
                fmt = "chat" if mode == "loss" else args.prompt_format
                if fmt == "lm-eval":
                    setup["lm_eval_task"] = PROMPT_FORMATS[fmt][name].lm_eval_task
                task = Task(name, mode, role, fmt, None, setup, {})
                task.path = folder / (f"{name}-loss.jsonl" if mode == "loss" else f"{task.key}.jsonl")
                task.done = stored_rows(task.path, setup)
                tasks.append(task)
    return source, tokenizer, data, out, summary, tasks


def evaluate(args):
    import torch

    from medtune.evaluation import models as em
    from medtune.evaluation.runs import RUNNERS

    source, tokenizer, data, out, summary, tasks = plan(args)
    system = em.system_prompt(source)
    for name, (items, where) in data.items():
        print(f"{name}: {len(items)} {'rows' if name == HELDOUT else 'items'} from {where}", flush=True)
    written = []
    fast = args.engine != "static" and "generate" in args.modes
    for role, model in em.models(source, args.compare_base, fast=fast):
        context = dict(model=model, tokenizer=tokenizer, system=system, stop=em.stop_ids(model, tokenizer, source),
                       source=source, args=args)
        for task in (t for t in tasks if t.role == role):
            task.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                entry = RUNNERS[task.mode](task, data[task.name][0], **context)
            except torch.OutOfMemoryError:
                rows = f"--batch-size {args.batch_size or 8}" if args.batch_size or args.engine == "static" or \
                    task.mode != "generate" else "as many rows at once as the free memory seemed to hold"
                raise UserError(f"Out of GPU memory on {task.key} ({role}) with {rows}"
                                f"{f' and --max-new-tokens {args.max_new_tokens}' if task.mode == 'generate' else ''}. "
                                "Pass a lower --batch-size (or --max-new-tokens) and run the same command again: "
                                "finished items are kept in "
                                f"{task.path} and are not evaluated again.") from None
            if task.mode == "generate":
                entry["weights"] = em.weights_of(model)
            summary["results"].setdefault(role, {})[task.key] = {
                **entry, "file": str(task.path.relative_to(out)), "prompt_format": task.prompt_format, **task.setup,
                **({} if task.mode == "loss" else {"limit": args.limit, "seed": args.seed})}
            write_json_atomic(out / "summary.json", summary)
            written.append(task.path)
        del model, context  # the next role's model takes its place in memory
    print_table(summary, tasks)
    print(f"\nWrote {out}/:")
    for path in written:
        print(f"  {str(path.relative_to(out)):32s} one line per item")
    print(f"  {'summary.json':32s} every result above, with its settings")
    if noise.where():
        print(noise.where())
    return out, summary


def _pct(x):
    return f"{100 * x:.1f}%"


def _acc(entry, key="accuracy", ci="ci95"):
    lo, hi = entry[ci]
    return f"{_pct(entry[key])} [{100 * lo:.1f}, {100 * hi:.1f}]"


def print_table(summary, tasks):
    header = ("benchmark", "mode", "model", "n", "accuracy [95% CI]", "acc_norm [95% CI]", "unparseable",
              "format ok", "median tokens")
    lines, losses = [], []
    for task in tasks:
        e = summary["results"][task.role][task.key]
        if task.mode == "loss":
            losses.append(f"{task.name:10s} {task.role:10s} {e['rows']} rows, {e['tokens']:,} answer tokens: "
                          f"loss {e['loss']:.4f}, perplexity {e['perplexity']:,.2f}")
        elif task.mode == "generate":
            lines.append((task.name, task.mode, task.role, str(e["n"]), _acc(e), "", _pct(e["unparseable_rate"]),
                          _pct(e["format_ok_rate"]), f"{e['median_output_tokens']:g}"))
        else:
            mode = "loglik (lm-eval)" if task.prompt_format == "lm-eval" else task.mode
            lines.append((task.name, mode, task.role, str(e["n"]), _acc(e), _acc(e, "accuracy_norm", "ci95_norm"),
                          "", "", ""))
    if lines:
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        print()
        for row in [header, *lines]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if losses:
        print("\nHeld-out loss on the answer tokens (as in training):")
        for line in losses:
            print("  " + line)


@report_user_errors
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    noise.divert("evaluate", args.verbose)  # before the imports that print it
    evaluate(args)
