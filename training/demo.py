"""The offline demo (`python -m training.docvqa --preset demo`): synthetic DocVQA-shaped documents and a small
Florence-2 trained from scratch on the CPU.

The model keeps Florence-2's architecture and its real tokenizer (51289 tokens) but is small (vision dims 32-256,
two text layers of width 256) and sees 256x256 images. Trained for a few minutes it learns the questions a small
model can learn that fast (the kind of document, the colour of its header, whether it has a stamp or a signature,
how many rows its table has, its largest word); the reading questions (invoice numbers, dates, amounts, names) need
the real pretrained model and stay near zero. The run reports ANLS per question type.
"""

from __future__ import annotations

from pathlib import Path

from florence2 import Florence2
from florence2.config import Florence2Config, TextConfig, VisionConfig
from florence2.processor import Florence2Processor

IMAGE_SIZE = 256
TRAIN_DOCUMENTS = 400
VALIDATION_DOCUMENTS = 40


def demo_config() -> Florence2Config:
    return Florence2Config(
        VisionConfig(dim_embed=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), num_groups=(1, 2, 4, 8),
                     depths=(1, 1, 2, 1), window_size=8, drop_path_rate=0.0, projection_dim=256),
        TextConfig(d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                   max_position_embeddings=256, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0),
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
