"""Export: merged safetensors, GGUF, Ollama Modelfile, verification."""
