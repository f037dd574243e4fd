"""Fine-tune Mistral-7B-Instruct-v0.2 for medical step-by-step reasoning (Unsloth 4-bit LoRA + TRL).

    python scripts/train_mistral.py --smoke     # offline quickstart: tiny model, bundled sample, CPU
    python scripts/train_mistral.py             # the real run on a GPU (Colab T4 is enough)
    python scripts/train_mistral.py --help      # every option
"""
from medtune.train.cli import main

if __name__ == "__main__":
    main("mistral")
