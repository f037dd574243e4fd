"""Export a run folder: LoRA merged into the 16-bit base (safetensors), GGUF files for llama.cpp and
Ollama, a Modelfile, and checks that each file computes the fine-tuned model.

The module behind scripts/export.py:

    python scripts/export.py checkpoints/phi3-smoke                      # q4_k_m GGUF + merged model
    python scripts/export.py checkpoints/phi3-medical --quant q4_k_m,q8_0,f16 --overwrite
"""
import argparse
import json
import os
import re
import shutil
import sys
import time

from medtune import noise
from medtune.errors import UserError, parse_options, report_user_errors
from medtune.export import workdir
from medtune.runfolder import EXPORT, FOR_EXPORT, open_run


def parse_args(argv):
    from medtune.export.gguf import QUANT_TYPES

    p = argparse.ArgumentParser(prog="scripts/export.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("run", help="run folder written by train_phi.py / train_mistral.py (checkpoints/NAME)")
    p.add_argument("--quant", default="q4_k_m",
                   help=f"comma-separated GGUF types to write, of {', '.join(QUANT_TYPES)} (default: q4_k_m)")
    p.add_argument("--merged-dtype", default="float16", choices=("float16", "bfloat16"),
                   help="dtype of the merged safetensors (default float16: exact in GGUF f16, and what a T4 runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export/ folder")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip loading each GGUF in llama.cpp and comparing it with the merged model")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload to this Hugging Face repo (owner/name)")
    p.add_argument("--push", choices=("all", "merged", "gguf"), default="all",
                   help="what --push-to-hub uploads (default: all)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--verbose", action="store_true",
                   help="show llama.cpp's and other libraries' output instead of keeping it in the log file")
    args = parse_options(p, argv)
    quants = [q.strip().lower() for q in args.quant.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANT_TYPES]
    if bad or not quants:
        raise UserError(f"Unknown GGUF type(s) {', '.join(bad) or repr(args.quant)} in --quant. Valid types: "
                        f"{', '.join(QUANT_TYPES)}.")
    args.quants = list(dict.fromkeys(quants))
    check_push_args(args)
    return args


def count_parameters(base_dir):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_disk(where, n_params, quants):
    """Fail before writing anything if the export can't fit."""
    from medtune.export.gguf import BYTES_PER_PARAM

    needed = n_params * (2.0 + 2.0 + sum(BYTES_PER_PARAM[q] for q in quants if q != "f16")) * 1.05
    free = shutil.disk_usage(where).free
    if free < needed:
        raise UserError(f"Not enough disk space in {where}: the export needs about {needed / 1e9:.1f} GB (merged "
                        f"16-bit model, f16 GGUF and {', '.join(quants)} for {n_params / 1e9:.2f}B parameters) but "
                        f"{free / 1e9:.1f} GB is free. Free some space or export fewer --quant types.")
    return needed


def check_push_args(args):
    if not args.push_to_hub:
        return
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", args.push_to_hub):
        raise UserError(f"--push-to-hub {args.push_to_hub!r} is not a Hub repo id; use owner/name.")
    from huggingface_hub import get_token

    if not get_token():
        raise UserError("--push-to-hub needs a Hugging Face token: run `huggingface-cli login` or set HF_TOKEN.")


class Stages:
    """Times each stage and prints its progress."""

    def __init__(self):
        self.times = {}

    def run(self, name, fn, *args, **kwargs):
        print(f"[{name}] ...", flush=True)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - started, 2)
        print(f"[{name}] done in {self.times[name]:.1f} s", flush=True)
        return result


def write_generation_config(merged_dir, tokenizer, family):
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=family.stop_ids(tokenizer),
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(merged_dir)


def export(args):
    """Everything but the CLI wrapper."""
    from medtune.export import gguf as gguf_export
    from medtune.export import merge, modelfile
    from medtune.export.verify import sample_answer

    run = open_run(args.run, FOR_EXPORT)
    workdir.clean_up_killed_exports(run.path)
    if problem := modelfile.quoting_problem(run.system_prompt()):  # a run trained before training checked this
        raise UserError(f"The run's system prompt ({run.path / 'system_prompt.txt'}) can't go into an Ollama "
                        f"Modelfile: {problem}. Edit that file, then export again.")
    final = run.path / EXPORT
    if final.exists() and not args.overwrite:
        raise UserError(f"{final} already exists. Add --overwrite to replace it.")
    gguf_export.llama_cpp_sources()
    gguf_export.llama_cpp_module()
    source = run.base_source()
    base_dir, _ = merge.base_files(source)
    n_params = count_parameters(base_dir)
    check_disk(run.path, n_params, args.quants)

    tmp = run.path / f".export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    stages = Stages()
    try:
        tokenizer, ollama_from, checks = write_files(run, args, source, tmp, stages)
        report = {
            "run": str(run.path), "family": run.family.name, "base_model": source, "parameters": n_params,
            "merged_dtype": args.merged_dtype, "stage_seconds": stages.times,
            "files": {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()},
            "checks": checks, "passed": all(c["ok"] for c in checks),
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        publish(run, tmp, final, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["files"] = {f"export/{k}": v for k, v in report["files"].items()}
    print_report(final, report)
    ollama_file = final / ollama_from.name
    answer = sample_answer(ollama_file, tokenizer, run.family, run.system_prompt(), run.path)
    print(f"\nOne answer from {ollama_file} through llama.cpp (greedy, 64 tokens"
          f"{'; a smoke run is a random-weight model, so expect gibberish' if run.smoke else ''}):\n"
          f"{answer}\n")
    if args.push_to_hub:
        stages.run("push", push, final, args)
    print(f"Wrote {final}/ (report: {final / 'report.json'}).")
    if noise.where():
        print(noise.where())
    return final, report


def write_files(run, args, source, tmp, stages):
    """The merged model, the GGUF files, the Modelfile and (unless --no-verify) the checks, into `tmp`.
    Returns the merged model's tokenizer, the GGUF the Modelfile names and the checks."""
    import torch
    from transformers import AutoTokenizer

    from medtune.export import gguf as gguf_export
    from medtune.export import merge
    from medtune.export import modelfile
    from medtune.export.verify import verify

    family, run_name = run.family, run.name
    merged = tmp / "merged"
    merged.mkdir()
    stages.run("merge", merge.merge, run.path, source, merged, getattr(torch, args.merged_dtype))
    merge.copy_tokenizer(run.path, merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    write_generation_config(merged, tokenizer, family)

    # llama.cpp applies Phi-3's whitespace rules to models whose name says phi-3 (src/llama-vocab.cpp)
    model_name = f"{family.gguf_name} {run_name}"
    ggufs = {q: tmp / f"{run_name}-{q}.gguf" for q in args.quants}
    f16 = ggufs.get("f16", tmp / f"{run_name}-f16.intermediate.gguf")
    stages.run("gguf f16", gguf_export.convert, merged, f16, "f16", model_name)
    for q in args.quants:
        if q in ("bf16", "q8_0"):
            stages.run(f"gguf {q}", gguf_export.convert, merged, ggufs[q], q, model_name)
        elif q != "f16":
            stages.run(f"quantize {q}", noise.quietly(gguf_export.quantize), f16, ggufs[q], q)
    system_prompt = run.system_prompt()
    ollama_from = ggufs.get("q4_k_m") or min(ggufs.values(), key=lambda p: p.stat().st_size)
    (tmp / "Modelfile").write_text(modelfile.modelfile(family, ollama_from.name, system_prompt))
    checks = []
    if args.verify:
        checks = stages.run("verify", verify, run.path, source, merged, f16, ggufs, family, tokenizer, system_prompt)
    if "f16" not in args.quants:
        f16.unlink()
        for c in checks:  # the table names what is kept
            c["file"] = c["file"].replace(f16.name, "f16 GGUF (intermediate, not kept)")
    return tokenizer, ollama_from, checks


def publish(run, tmp, final, report):
    """Rename the finished `tmp` to export/ (replacing an earlier one), or, when a check failed, to
    export.unverified/ with an error."""
    if not report["passed"]:
        kept = run.path / "export.unverified"
        shutil.rmtree(kept, ignore_errors=True)
        tmp.rename(kept)
        print_checks(report["checks"])
        failed = ", ".join(f"{c['file']}: {c['check']}" for c in report["checks"] if not c["ok"])
        raise UserError(f"Verification failed ({failed}): these files do not compute the fine-tuned model "
                        f"within tolerance (numbers in the table above). They are kept for inspection in {kept}, "
                        f"not in {final}; export again with --no-verify to accept them anyway.")
    if final.exists():
        old = run.path / f".export-old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def print_checks(checks):
    rows = [("file", "check", "value", "limit", "ok")]
    rows += [(c["file"], c["check"], str(c["value"]), str(c["limit"]), "yes" if c["ok"] else "NO") for c in checks]
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print(f"{r[0]:{width[0]}s}  {r[1]:{width[1]}s}  {r[2]:>{width[2]}s}  {r[3]:>{width[3]}s}  {r[4]}")


def print_report(final, report):
    print(f"\nExported {report['family']} run to {final}/")
    for name, size in report["files"].items():
        print(f"  {name:48s} {size / 2**20:10.1f} MiB")
    print("Time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["stage_seconds"].items()))
    if report["checks"]:
        print_checks(report["checks"])


def push(final, args):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
    if args.push in ("all", "merged"):
        api.upload_folder(repo_id=args.push_to_hub, folder_path=final / "merged")
    if args.push in ("all", "gguf"):
        for f in [*final.glob("*.gguf"), final / "Modelfile", final / "report.json"]:
            api.upload_file(path_or_fileobj=f, path_in_repo=f.name, repo_id=args.push_to_hub)


@report_user_errors
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    noise.divert("export", args.verbose)
    export(args)
