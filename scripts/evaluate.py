"""Evaluate a fine-tuned run (or its export, or a Hub model) on MedQA, MedMCQA and PubMedQA, and
the run on its held-out split: accuracy with 95% intervals, answer format, held-out loss.

    python scripts/evaluate.py checkpoints/phi3-medical --compare-base
    python scripts/evaluate.py checkpoints/phi3-medical --mode loglik --limit 500
    python scripts/evaluate.py checkpoints/phi3-smoke --offline --max-new-tokens 32
    python scripts/evaluate.py --help
"""
from medtune.evaluation.cli import main

if __name__ == "__main__":
    main()
