"""Fine-tuning Florence-2: python -m training.docvqa."""
