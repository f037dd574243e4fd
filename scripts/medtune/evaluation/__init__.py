"""Evaluation: MedQA, MedMCQA, PubMedQA and held-out loss."""
