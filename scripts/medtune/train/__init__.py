"""Training: config to run folder (Unsloth + TRL)."""
