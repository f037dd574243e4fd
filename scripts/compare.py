"""Compare two fine-tuning runs, measured: training speed, peak GPU memory, benchmark accuracy (base
and fine-tuned), answer format, verbosity. Writes a GitHub-ready report.md with charts.

    python scripts/compare.py checkpoints/phi3-medical checkpoints/mistral-medical
    python scripts/compare.py checkpoints/phi3-smoke checkpoints/mistral-smoke --out reports/smoke
    python scripts/compare.py --help

Evaluate each run first (python scripts/evaluate.py RUN --compare-base --mode generate,loglik).
"""
from medtune.compare.cli import main

if __name__ == "__main__":
    main()
