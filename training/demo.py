"""The offline demo (`python -m training.docvqa --preset demo`): synthetic DocVQA-shaped documents and a small
Florence-2 trained from scratch on the CPU.

The model keeps Florence-2's architecture and its real tokenizer (51289 tokens) but is small (vision dims 24-192,
two text layers of width 192) and sees 192x192 images. Trained for a few minutes it learns the questions a small
model can learn that fast (the kind of document, the colour of its header, whether it has a stamp or a signature,
how many rows its table has, its largest word); the reading questions (invoice numbers, dates, amounts, names) need
the real pretrained model and stay near zero. The run reports ANLS per question type.

From scratch, the recipe is SGD with Nesterov momentum rather than the blog's AdamW (see --optimizer), without
dropout, and with the token embedding scaled by sqrt(d_model) (BART's `scale_embedding`) so that tokens stand out
from the learned positions at the encoder's input.
"""

from __future__ import annotations

from pathlib import Path

from florence2 import Florence2
from florence2.config import Florence2Config, TextConfig, VisionConfig
from florence2.processor import Florence2Processor

IMAGE_SIZE = 192
TRAIN_DOCUMENTS = 300
VALIDATION_DOCUMENTS = 40


def demo_config() -> Florence2Config:
    return Florence2Config(
        VisionConfig(dim_embed=(24, 48, 96, 192), num_heads=(1, 2, 4, 8), num_groups=(1, 2, 4, 8),
                     depths=(1, 1, 2, 1), window_size=6, drop_path_rate=0.0, projection_dim=192),
        TextConfig(d_model=192, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=768, decoder_ffn_dim=768,
                   max_position_embeddings=256, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                   scale_embedding=True),
    )


def demo_processor() -> Florence2Processor:
    return Florence2Processor(image_size=IMAGE_SIZE)


def demo_model(processor: Florence2Processor, seed: int) -> Florence2:
    config = demo_config()
    if processor.vocab_size != config.text.vocab_size:
        raise ValueError(f"tokenizer has {processor.vocab_size} tokens, the demo model {config.text.vocab_size}")
    return Florence2.from_config(config, seed=seed)


def ensure_demo_data(folder: Path, seed: int, log=print) -> Path:
    """Write the synthetic dataset once; a later run (or --resume) reuses it."""
    from .synthetic import write_dataset

    if (folder / "dataset_dict.json").is_file():
        return folder
    log(f"writing the synthetic documents to {folder} ...")
    write_dataset(folder, train_documents=TRAIN_DOCUMENTS, validation_documents=VALIDATION_DOCUMENTS, seed=seed)
    return folder
