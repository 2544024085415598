"""Fine-tuning and evaluating Florence-2: python -m training.finetune, training.docvqa, training.evaluate."""
