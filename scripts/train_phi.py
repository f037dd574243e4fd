"""Fine-tune Phi-3-mini-4k-instruct for medical step-by-step reasoning (Unsloth 4-bit LoRA + TRL).

    python scripts/train_phi.py --smoke     # offline quickstart: tiny model, bundled sample, CPU
    python scripts/train_phi.py             # the real run on a GPU (Colab T4 is enough)
    python scripts/train_phi.py --help      # every option
"""
from medtune.train.cli import main

if __name__ == "__main__":
    main("phi3")
