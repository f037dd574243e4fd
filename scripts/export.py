"""Export a training run for llama.cpp, Ollama and transformers: merged 16-bit safetensors, GGUF
files (llama.cpp's own converter and quantizer, offline) and an Ollama Modelfile, each verified.

    python scripts/export.py checkpoints/phi3-smoke
    python scripts/export.py checkpoints/phi3-medical --quant q4_k_m,q8_0,f16
    python scripts/export.py --help
"""
from medtune.export.cli import main

if __name__ == "__main__":
    main()
