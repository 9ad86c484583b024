"""CTC fine-tuning, evaluation and export of pretrained checkpoints."""
