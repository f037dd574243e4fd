"""Throughput of evaluate.py's generation: the earlier path against continuous batching, on full-size
random-weight models (code and cases in medtune/bench/generation.py).

    python scripts/bench_eval.py --model /tmp/m/phi3-nf4 --family phi3 --case old:64:128 \
        --case continuous:64:128 --case continuous:512:256 --out phi3.jsonl
    python scripts/bench_eval.py --report phi3.jsonl mistral.jsonl --benchmarks-md BENCHMARKS.md
"""
import argparse
import json
import sys

from medtune.errors import UserError, report_user_errors


@report_user_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model folder (4-bit, as the build job saves it)")
    p.add_argument("--family", help="phi3 or mistral")
    p.add_argument("--case", action="append", default=[], help="NAME[@ROWS]:PROMPTS:NEW_TOKENS[:CAP_GIB], repeatable")
    p.add_argument("--case-timeout", type=int, default=120, help="seconds a case may run (default 120)")
    p.add_argument("--out", help="JSON lines file to append each case's result to")
    p.add_argument("--report", nargs="+", help="JSON lines files to turn into the BENCHMARKS.md section")
    p.add_argument("--command", default="scripts/bench_eval.py", help="the command named in the section")
    p.add_argument("--benchmarks-md", help="write the section into this file (default: print it)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from medtune.bench import generation

    if args.report:
        rows = [json.loads(line) for path in args.report for line in open(path) if line.strip()]
        text = generation.report(rows, args.command)
        if args.benchmarks_md:
            generation.write_section(args.benchmarks_md, text)
        print(text)
        return
    from medtune.config import REPO_ROOT
    from medtune.families import FAMILIES

    if not (args.model and args.family in FAMILIES and args.case and args.out):
        raise UserError("Pass --model FOLDER, --family phi3|mistral, at least one --case and --out FILE (or --report "
                        "FILES to write the section).")
    try:
        cases = [generation.parse_case(c) for c in args.case]
    except ValueError as e:
        raise UserError(f"{e}.") from None
    system = (REPO_ROOT / "prompts" / "system_prompt.txt").read_text().strip()
    generation.run_all(args.model, FAMILIES[args.family], cases, args.out, system, args.case_timeout)


if __name__ == "__main__":
    main()
