"""Throughput of `scripts/evaluate.py --mode generate`: the earlier path (4-bit weights, adapter
unmerged, model.generate over static batches of 16) against the continuous-batching path, on a
full-size random-weight model with a random LoRA adapter of the project's shape (rank 16 on the
family's targets). Random weights never emit end-of-turn: every row runs to the token limit, the
worst case. Each case is one line of JSON; a case with the same prompts and token limit as an
`old` case is compared with it output by output.

    python scripts/bench_eval.py --model /tmp/m/phi3-nf4 --family phi3 --case old:64:128 \\
        --case continuous:64:128 --case continuous:512:256 --case continuous:256:256:15 --out phi3.jsonl
    python scripts/bench_eval.py --report phi3.jsonl mistral.jsonl     # the BENCHMARKS.md section

A case is NAME[@ROWS]:PROMPTS:NEW_TOKENS[:CAP_GIB], NAME one of CASES or `best` (the fastest case
measured so far in this process, old excepted); ROWS is the static batch or the most rows generated
at once; CAP_GIB caps this process's GPU memory (torch.cuda.set_per_process_memory_fraction), the
stand-in for a 15 GB T4. A case that runs past --case-timeout is recorded as such and skipped.
"""
import gc
import math
import json
import time
from pathlib import Path

import torch

CASES = {
    "old": dict(weights="4-bit", engine="static", batch=16),
    "static16": dict(weights="16-bit", engine="static", batch=16),
    "continuous": dict(weights="16-bit", engine="continuous"),
    "continuous-merged": dict(weights="16-bit", engine="continuous", merge=True),
    "continuous-graphs": dict(weights="16-bit", engine="continuous", settings={"use_cuda_graph": True}),
    "continuous-4bit": dict(weights="4-bit", engine="continuous"),
    "compiled": dict(weights="16-bit", engine="compiled"),
    "compiled-graphs-only": dict(weights="16-bit", engine="compiled", compile_settings={"backend": "cudagraphs",
                                                                                        "mode": None}),
    "static-cache": dict(weights="16-bit", engine="compiled", compile=False),
    "compiled-4bit": dict(weights="4-bit", engine="compiled"),
}
LORA_B_STD = 2e-3  # B's spread after a short fine-tune; B = 0 (PEFT's start) would make the adapter a no-op


def parse_case(text):
    label, prompts, tokens, *cap = text.split(":")
    name, _, rows = label.partition("@")
    if name not in (*CASES, "best") or len(cap) > 1 or (rows and not rows.isdigit()):
        raise ValueError(f"case {text!r}: NAME[@ROWS]:PROMPTS:NEW_TOKENS[:CAP_GIB] with NAME one of "
                         f"{', '.join(CASES)}, best")
    case = {"case": name, "prompts": int(prompts), "new_tokens": int(tokens), "cap_gib": float(cap[0]) if cap else None}
    return _config(case, name, int(rows) if rows else None)


def _config(case, name, rows):
    config = {**case, **CASES.get(name, {}), "case": name, "rows": rows}
    if rows and config.get("engine") == "static":
        config["batch"] = rows
    return config


def bench_prompts(tokenizer, system, n):
    """`n` distinct chat prompts: the offline items in turn, each user turn opened by its case
    number, so prompts share only the system prompt (as real items do)."""
    from medtune.evaluation.models import prompt_text
    from medtune.evaluation.tasks import BENCHMARKS, load_items, user_message

    questions = [user_message(item, bench, "generate") for bench in BENCHMARKS.values()
                 for item in load_items(bench, offline=True)[0]]
    return [prompt_text(tokenizer, system, f"Case {k + 1}.\n{questions[k % len(questions)]}") for k in range(n)]


def make_adapter(model_dir, family, out):
    """A random LoRA adapter of the project's default shape on the model's real module names."""
    from peft import LoraConfig, get_peft_model

    from medtune.config import TrainConfig
    from medtune.evaluation.models import load_weights
    from medtune.families import linear_names, resolve_lora_targets

    base = load_weights(str(model_dir))
    targets, _ = resolve_lora_targets(family.lora_targets, linear_names(base))
    cfg = TrainConfig()
    model = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * LORA_B_STD)
    model.save_pretrained(out)
    del model, base
    _free()
    return out


def _free():
    gc.collect()
    torch.compiler.reset()  # compiled decode steps and their CUDA-graph memory pools go with their model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _load(case, model_dir, adapter):
    from peft import PeftModel

    from medtune.evaluation.models import load_weights, weights_of

    model = PeftModel.from_pretrained(load_weights(str(model_dir), case["weights"] == "16-bit"), adapter).eval()
    merged = case.get("merge") and weights_of(model) != "4-bit"
    return (model.merge_and_unload() if merged else model), bool(merged)


def run_case(case, model_dir, adapter, tokenizer, prompts, stop):
    """One measurement: the engine over the prompts, timed from the call to the last row (warm-up,
    prefill and any CUDA-graph capture included: what a user waits)."""
    from medtune.evaluation import generation
    from medtune.evaluation.models import weights_of

    capped = bool(case["cap_gib"]) and torch.cuda.is_available()
    if capped:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, case["cap_gib"] * 2**30 / total))
    try:
        started = time.perf_counter()
        model, merged = _load(case, model_dir, adapter)
        loaded = time.perf_counter() - started
        info = {}
        if case["engine"] == "static":
            steps = generation.static(model, tokenizer, prompts, stop, case["new_tokens"], case["batch"])
        elif case["engine"] == "compiled":
            steps = generation.compiled(model, tokenizer, prompts, stop, case["new_tokens"], case["rows"],
                                        compile=case.get("compile", True), compile_settings=case.get("compile_settings"),
                                        info=info)
        else:
            steps = generation.continuous(model, tokenizer, prompts, stop, case["new_tokens"], case["rows"],
                                          settings=case.get("settings"), info=info)
        started = time.perf_counter()
        outputs = {i: (text, n) for step in steps for i, text, n in step.results}
        seconds = time.perf_counter() - started
        weights = weights_of(model)
        del model, steps
    finally:
        if capped:
            torch.cuda.set_per_process_memory_fraction(1.0)
    tokens = sum(n for _, n in outputs.values())
    peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    _free()
    return {**case, "weights_used": weights, "merged": merged, "load_s": round(loaded, 1), "tokens": tokens,
            "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "peak_reserved_gib": round(peak, 1) if peak else None, "resolved": info,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}, outputs


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout


def run_all(model_dir, family, cases, out, system, case_timeout):
    """Every case in order, each line appended to `out` as soon as it is measured."""
    import signal
    import tempfile

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    stop = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(family.end_of_turn)})
    adapter = make_adapter(model_dir, family, Path(tempfile.mkdtemp()) / "adapter")
    references, measured = {}, []  # references: (prompts, new tokens) -> the old path's outputs
    signal.signal(signal.SIGALRM, _alarm)
    for case in cases:
        if case["case"] == "best":
            fastest = max((r for r in measured if r["case"] != "old" and not r["cap_gib"]),
                          key=lambda r: r["tokens_per_s"])
            case = _config(case, fastest["case"], fastest["rows"])
        prompts = bench_prompts(tokenizer, system, case["prompts"])
        signal.alarm(case_timeout)
        try:
            row, outputs = run_case(case, model_dir, adapter, tokenizer, prompts, stop)
        except CaseTimeout:
            row, outputs = {**case, "error": f"stopped after {case_timeout} s"}, None
        finally:
            signal.alarm(0)
        if outputs is None:
            _free()  # out of the except clause, whose traceback held the stopped case's model
        row.update(family=family.name, model=str(model_dir))
        if outputs is not None:
            measured.append(row)
            _compare(row, outputs, references, tokenizer)
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def _compare(row, outputs, references, tokenizer):
    key = (row["prompts"], row["new_tokens"])
    if row["case"] == "old":
        references[key] = outputs
    elif key in references:
        same = [i for i in outputs if outputs[i] == references[key][i]]
        row["identical_outputs"] = f"{len(same)}/{len(outputs)}"
        row["first_difference"] = _first_differences(tokenizer, outputs, references[key])


def _first_differences(tokenizer, outputs, reference):
    """For outputs that differ: the token position where they part (numerics flip a near-tie)."""
    where = []
    for i in sorted(outputs):
        if outputs[i] != reference[i]:
            a = tokenizer(outputs[i][0], add_special_tokens=False)["input_ids"]
            b = tokenizer(reference[i][0], add_special_tokens=False)["input_ids"]
            where.append(next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    return where


SECTION = "## Evaluation: generation throughput"
MEDQA_ITEMS = 1273


def _steady(r):
    """Tokens/s over the batches after the first (whose time includes compiling), or None."""
    resolved = r.get("resolved") or {}
    seconds, tokens = resolved.get("batch_seconds") or [], resolved.get("batch_tokens") or []
    return sum(tokens[1:]) / sum(seconds[1:]) if len(seconds) > 1 and sum(seconds[1:]) else None


def _path(r):
    resolved = r.get("resolved") or {}
    name = r["case"]
    if r["engine"] == "compiled" and not resolved.get("compiled"):
        name += ", decode step eager"
    rows = r.get("rows") or (resolved.get("rows") if r["engine"] == "compiled" else None)
    return name + (f" ({'batch' if r['engine'] != 'continuous' else 'at most'} {rows} rows)" if rows else "")


def _medqa(r):
    """Minutes of a full MedQA pass at this case's settings: from its batch times where it has two
    or more (the first, compile included, then one steady batch per further batch of rows), else
    from its overall rate."""
    resolved = r.get("resolved") or {}
    seconds, rows = resolved.get("batch_seconds") or [], resolved.get("rows")
    if len(seconds) > 1 and rows:
        batches, steady = math.ceil(MEDQA_ITEMS / rows), sum(seconds[1:]) / len(seconds[1:])
        total = seconds[0] + (batches - 1) * steady
        return total / 60, f"first batch {seconds[0]:.0f} s with compiling, then {batches - 1} batches of {rows} rows " \
                           f"at {steady:.0f} s each"
    return MEDQA_ITEMS * r["new_tokens"] / r["tokens_per_s"] / 60, f"at the overall {r['tokens_per_s']:,.0f} tokens/s"


def report(rows, command):
    """The BENCHMARKS.md section for these measurements."""
    lines = [SECTION, "", f"Measured with `{command}` (see scripts/bench_eval.py). Full-size random-weight models "
             "saved in 4-bit NF4 (`python -m medtune.bench.worker` build job) with a random rank-16 LoRA adapter on "
             "the family's targets. Random weights never emit end-of-turn, so every row runs to the token limit: the "
             "worst case for every path. Overall times run from the call to the last row: prefill, warm-up and "
             "compiling included; steady is the rate over the batches after the first.", "",
             "| model | path | weights | prompts x new tokens | GPU memory | tokens/s | vs old | steady tokens/s "
             "| same outputs as old | peak reserved |", "|---|---|---|---|---|---:|---:|---:|---|---:|"]
    old = {(r["family"], r["new_tokens"]): r["tokens_per_s"] for r in rows if r["case"] == "old"}
    for r in (r for r in rows if "error" not in r):
        base = old.get((r["family"], r["new_tokens"])) or next(
            (v for (f, _), v in old.items() if f == r["family"]), None)
        gain = f"{r['tokens_per_s'] / base:.1f}x" if base and r["case"] != "old" else ""
        cap = f"{r['cap_gib']:g} GiB cap" if r["cap_gib"] else "whole card"
        steady = _steady(r)
        lines.append(f"| {r['family']} | {_path(r)} | {r['weights_used']}{' merged' if r['merged'] else ''} | "
                     f"{r['prompts']} x {r['new_tokens']} | {cap} | {r['tokens_per_s']:,.0f} | {gain} | "
                     f"{f'{steady:,.0f}' if steady else ''} | {r.get('identical_outputs', '')} | "
                     f"{r['peak_reserved_gib']} GiB |")
    for r in rows:
        if "error" in r:
            lines.append(f"\n{r['family']} {r['case']} ({r['prompts']} x {r['new_tokens']}): {r['error']}, not measured.")
    for r in rows:
        if "error" not in r and r["new_tokens"] >= 1024 and r["engine"] != "static" and not r["cap_gib"]:
            minutes, how = _medqa(r)
            lines.append(f"\nA full MedQA test pass ({MEDQA_ITEMS:,} items, every one running to {r['new_tokens']:,} "
                         f"new tokens), {r['family']}, {_path(r)}, {r['device']}: {minutes:.1f} minutes ({how}).")
    return "\n".join(lines) + "\n"


def write_section(path, text):
    """Replace this section of BENCHMARKS.md (it runs to the next '## ' heading), or append it."""
    path = Path(path)
    current = path.read_text() if path.is_file() else ""
    if SECTION in current:
        head, rest = current.split(SECTION, 1)
        end = rest.find("\n## ")
        current = head + text + ("\n" + rest[end + 1:] if end >= 0 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)
