"""The offline demo (`python -m training.docvqa --preset demo`): synthetic DocVQA-shaped documents and a small
Florence-2 trained on the CPU, in two stages like the real model. This module holds the demo's model, its preset's
defaults (presets.py) and its orchestration: write the data and the initial model, then run the trainer twice.

The model keeps Florence-2's architecture and its real tokenizer (51289 tokens) but is small (vision dims 24-192,
two text layers of width 192) and sees 192x192 images.
1. Pretraining, from scratch: `<CAPTION>` on synthetic pages of its own (never the question pages), whose captions
   say what the page shows (the kind of document, the header colour, the title, the table rows, the stamp, the
   signature), as Florence-2 learned to describe images before it was fine-tuned on anything.
2. Fine-tuning on the DocVQA-shaped questions, from that checkpoint, evaluated before and after on held-out pages.
   Before, the model cannot answer a question (it only knows how to describe a page); after a few minutes it answers
   the questions on what the captions taught it to see (the kind of document, and with it the title; the header
   colour on some seeds), while the reading questions (invoice numbers, dates, amounts, names) need a real
   pretrained model and stay near their base rates. The run reports ANLS per question type.

From scratch, the recipe is AdamW with the vision tower at a tenth of the text model's learning rate (a DaViT from
scratch learns nothing at 1e-3), Adam's eps raised for the token embedding (see --embedding-eps), no dropout, a
wider initialization than BART's 0.02 (0.06: the text model then learns to use the image tokens several times
faster) and the token embedding scaled by sqrt(d_model) (BART's `scale_embedding`) so that tokens stand out from the
learned positions at the encoder's input.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from florence2 import Florence2
from florence2.config import Florence2Config, TextConfig, VisionConfig
from florence2.hardware import matmul_peak
from florence2.processor import Florence2Processor

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig
from .trainer import fit

IMAGE_SIZE = 192
TRAIN_DOCUMENTS = 300
VALIDATION_DOCUMENTS = 40
CAPTION_DOCUMENTS = 1600  # the pretraining pages, none of them among the question pages
CAPTION_VALIDATION_DOCUMENTS = 32
PRETRAIN_EPOCHS = 4
VISION_LR = 1e-4  # the tower's rate where it trains: a DaViT from scratch learns nothing at the text model's 1e-3
# The demos load their small pages in the training process: on 2 cores, DataLoader workers take the cores from the
# step's threads (the <OD> demo: 27 instead of 22 pages/s), while loading a 300x400 page costs 2.5 ms.
LOADER_WORKERS = 0
SPEED_MATMUL, SPEED_REPS = 2048, 4  # the machine's speed: 6 sgemms of 2048x2048, about a second on 2 cores
DEMO_MODEL = "demo"  # --model of the preset: the small model, pretrained by the demo itself
DEMO_DATA, DEMO_CAPTIONS, DEMO_PRETRAIN, INITIAL_MODEL = "demo-data", "demo-captions", "pretrain", "initial-model"


def demo_config() -> Florence2Config:
    return Florence2Config(
        VisionConfig(dim_embed=(24, 48, 96, 192), num_heads=(1, 2, 4, 8), num_groups=(1, 2, 4, 8),
                     depths=(1, 1, 2, 1), window_size=6, drop_path_rate=0.0, projection_dim=192),
        TextConfig(d_model=192, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=768, decoder_ffn_dim=768,
                   max_position_embeddings=256, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                   scale_embedding=True, init_std=0.06),
    )


def demo_processor() -> Florence2Processor:
    return Florence2Processor(image_size=IMAGE_SIZE)


def demo_model(processor: Florence2Processor, seed: int) -> Florence2:
    config = demo_config()
    if processor.vocab_size != config.text.vocab_size:
        raise ValueError(f"tokenizer has {processor.vocab_size} tokens, the demo model {config.text.vocab_size}")
    return Florence2.from_config(config, seed=seed)


def ensure_demo_data(folder: Path, seed: int, captions: bool = False, log=print) -> Path:
    """Write the synthetic questions (or, with `captions`, the pretraining captions) once; a later run (or --resume)
    reuses them."""
    from .synthetic import write_dataset

    if (folder / "dataset_dict.json").is_file():
        return folder
    log(f"writing the synthetic {'captions' if captions else 'documents'} to {folder} ...")
    counts = (CAPTION_DOCUMENTS, CAPTION_VALIDATION_DOCUMENTS) if captions else (TRAIN_DOCUMENTS, VALIDATION_DOCUMENTS)
    write_dataset(folder, *counts, seed=seed, captions=captions)
    return folder


def docvqa_defaults(first) -> dict:
    """The preset: a small Florence-2 on synthetic documents, trained from scratch (see the module's docstring)."""
    defaults = {"model": DEMO_MODEL, "dataset": str(first.output_dir / DEMO_DATA), "epochs": 3, "batch_size": 16,
                "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 20,
                "eval_before_training": True, "num_beams": 1, "max_new_tokens": 12, "log_every": 5,
                "num_workers": LOADER_WORKERS,
                "feature_cache": "memory"}  # fine-tuning: the pretrained tower frozen, cached
    if first.train_vision:  # --train-vision: the tower trains in fine-tuning too (at the pretraining's rate)
        defaults.update(vision_lr=VISION_LR, feature_cache="none")
    if first.optimizer == "adamw":  # an AdamW setting: not for --optimizer sgd
        defaults["embedding_eps"] = 3e-4
    return defaults


def timed(run: Callable[[TrainConfig], tuple[dict, int]]) -> Callable[[TrainConfig], dict]:
    """A demo's orchestration `run(cfg) -> (summary, steps)`, measured: the machine's float32 matmul rate first (a
    second of sgemm), then at the end the demo's time beside it, so that times of different sittings compare."""

    @functools.wraps(run)
    def measured(cfg: TrainConfig) -> dict:
        d = distributed.setup(cfg.device)
        speed = matmul_peak(d.device, n=SPEED_MATMUL, reps=SPEED_REPS)["median"]
        if d.is_main:
            print(f"this machine: float32 matmul {speed:.1f} GFLOP/s ({d.device}, {torch.get_num_threads()} threads)",
                  flush=True)
        started = time.perf_counter()
        summary, steps = run(cfg)
        seconds = time.perf_counter() - started
        if d.is_main:
            minutes, rest = divmod(round(seconds), 60)
            print(f"demo: {minutes} min {rest:02d} s in all, {steps} optimizer steps ({steps / seconds:.2f} steps/s "
                  f"with the data, the evaluations and the saves), on a machine of {speed:.1f} GFLOP/s (float32 "
                  "matmul)", flush=True)
        return {**summary, "demo_seconds": seconds, "matmul_gflops": speed}

    return measured


@timed
def run_docvqa(cfg: TrainConfig) -> tuple[dict, int]:
    """Write the synthetic documents (and, for the demo's own model, its captions and initial weights), pretrain
    that model on the captions (a finished stage is reused: --resume auto), then fine-tune it on the questions.
    Returns the fine-tuning's summary and the steps of both stages."""
    d = distributed.setup(cfg.device)
    stage_dir = cfg.output_dir / DEMO_PRETRAIN
    if d.is_main:
        if cfg.dataset == str(cfg.output_dir / DEMO_DATA):
            ensure_demo_data(Path(cfg.dataset), seed=cfg.seed)
        if cfg.model == DEMO_MODEL:
            ensure_demo_data(stage_dir / DEMO_CAPTIONS, seed=cfg.seed, captions=True)
            ensure_initial_model(stage_dir / INITIAL_MODEL, seed=cfg.seed)
    distributed.barrier(d)
    pretraining_steps = 0
    if cfg.model == DEMO_MODEL:
        stage = replace(cfg, output_dir=stage_dir, model=str(stage_dir / INITIAL_MODEL),
                        dataset=str(stage_dir / DEMO_CAPTIONS), prompt_template="{question}", epochs=PRETRAIN_EPOCHS,
                        resume="auto", eval_before_training=False, max_new_tokens=40, train_vision=True,
                        vision_lr=VISION_LR, feature_cache="none")
        pretraining_steps = fit(stage)["steps"]
        cfg = replace(cfg, model=str(ckpt.latest_checkpoint(stage_dir)))
    summary = fit(cfg)
    return summary, pretraining_steps + summary["steps"]


def ensure_initial_model(folder: Path, seed: int, build=demo_model) -> Path:
    """The demo model as initialized from `seed` by `build(processor, seed)`, saved once
    (written aside, then renamed into place)."""
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    processor = demo_processor()
    build(processor, seed=seed).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.rename(folder)
    return folder
