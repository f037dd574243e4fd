"""The measured Phi-3 vs Mistral report."""
