"""GPU training-speed benchmark."""
