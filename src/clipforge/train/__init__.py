"""What the adapter and fine-tuning trainers share: launch, loop pieces, checkpoints, metrics."""
