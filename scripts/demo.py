"""Gradio demo of an exported or trained model: streamed answers with the reasoning in a collapsible
block, generation settings, speed, and a side-by-side comparison of two models.

    python scripts/demo.py checkpoints/phi3-smoke                 # the export's q4_k_m GGUF, llama.cpp
    python scripts/demo.py checkpoints/phi3-medical --compare checkpoints/mistral-medical
    python scripts/demo.py checkpoints/phi3-medical --share       # Colab: a public link
"""
from medtune.demo.cli import main

if __name__ == "__main__":
    main()
