"""Benchmark training on one CUDA GPU: this project against a plain transformers + PEFT QLoRA baseline
and the Unsloth notebook configuration, the T4 memory budget, and the tuning of the defaults.

    python scripts/benchmark.py [--models phi3,mistral] [--steps 20] [--out checkpoints/benchmark]
"""
from medtune.bench.cli import run_benchmark
from medtune.errors import report_user_errors

if __name__ == "__main__":
    report_user_errors(run_benchmark)()
