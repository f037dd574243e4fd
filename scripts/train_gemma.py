"""Fine-tune Gemma-3-1B-it for medical step-by-step reasoning (Unsloth 4-bit LoRA + TRL).

    python scripts/train_gemma.py --smoke     # offline: tiny random-weight Gemma 3, real tokenizer, CPU
    python scripts/train_gemma.py --model .cache/medtune/models/gemma-3-270m --no-load-in-4bit \\
        --max-seq-length 384 --max-steps 30   # offline: the real Gemma-3-270M (README, second quickstart)
    python scripts/train_gemma.py             # the real run on a GPU: unsloth/gemma-3-1b-it-bnb-4bit
    python scripts/train_gemma.py --help      # every option
"""
from medtune.train.cli import main

if __name__ == "__main__":
    main("gemma3")
