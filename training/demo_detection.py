"""The offline detection demo (`python -m training.finetune --preset demo --task "<OD>"`): synthetic document pages
with labelled regions, written as a COCO export, and the DocVQA demo's small Florence-2 (demo.py) trained on them
from scratch on the CPU, evaluated with COCO mAP on held-out pages before and after.

1. The data: `training/synthetic_detection.py` draws pages with 2-5 regions each (header, title, table, stamp,
   signature) among unlabelled small print, in the blocks of a page layout at random sizes and places, and writes
   them in Roboflow's COCO layout under OUTPUT_DIR/demo-data (train/, valid/, test/, each an `_annotations.coco.json`
   beside its PNG pages): the format a user's own export has, read by the trainer's ordinary `--format auto`.
2. The model: demo.py's (vision dims 24-192, 2+2 text layers of width 192, 192x192 images, the real tokenizer), with
   two changes of initialization, the demo's stand-in for what pretraining gives Florence-2:
   - the rows of the token embedding for `<loc_0>`..`<loc_999>` (tied to the output layer) start as smooth functions
     of their bin (Gaussian bumps of the bin index on random directions, plus a little noise; see
     `location_embeddings`) instead of 1000 unrelated random vectors, so that neighbouring bins share what each of
     them learns;
   - the position tables (the image's 2-D one, the text encoder's and decoder's) start as large as what they are
     added to (DaViT features of spread about 1, token embeddings scaled by sqrt(d_model)), not at init_std's 0.06,
     which is lost beside them: with it the decoder could not count the four coordinates of a box (it wrote two,
     then the next label) and the image tokens barely said where they were.
3. Training from that initialization with the DocVQA demo's recipe for training from scratch (AdamW, the vision tower at
   a lower learning rate, a larger Adam eps for the token embedding), at the higher rates that learned fastest here
   (2e-3, the vision tower 3e-4), no caption stage, two epochs over 6000 pages, and the text encoder frozen at its
   random initialization (`--no-train-text-encoder`). Trained, the encoder learns first to erase the image tokens,
   before the decoder has learned to read them: the image is noise to a decoder that writes the layout's priors. On
   pages of one region each (vision tower frozen), its self-attention outputs grew from 0.33 to 1.9 of the residual's
   scale, nearly the same for every token, and the image tokens it put out differed across pages by 4% of their scale
   (29% at initialization); the decoder wrote the same box on every page. Frozen, the random encoder passes the image
   through and the gradient reaches the vision tower: a linear probe on the tower's tokens finds stamps 0.58 of the time
   after this recipe (0.03 at initialization, 0.08 with the encoder trained).
What it learns in those minutes (README, "the detection demo"): the header (AP50 1.0), and the other categories
on the page in the second epoch (AP50 0.15-0.51 each): mAP50 0.44 from 0.
Before training and at the end of each epoch the trainer logs eval_map, eval_map50 and eval_map75 on
the valid split; `blind-baseline.json` holds what an image-blind guess scores there (each category's mean box on every
page).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from . import demo, distributed, metrics
from . import synthetic_detection as pages
from .config import TrainConfig
from .trainer import fit

TRAIN_PAGES = 6000
VALID_PAGES = 64
TEST_PAGES = 64  # not used by the run: for `python -m training.evaluate` on pages no run has seen
DEMO_DATA, INITIAL_MODEL, BLIND_BASELINE = "demo-data", "initial-model", "blind-baseline.json"
LOCATION_SPACING = 25  # bins between the centres of the location rows' bumps (25 bins: 5 px at 192)
LOCATION_NOISE = 0.25  # the noise's share of a location row's scale
IMAGE_POSITION_STD = 1.0  # the image's position table, added to DaViT features whose spread is about 1


def detection_defaults(first) -> dict:
    """The preset: the small model on synthetic document regions, trained from scratch (see the module's
    docstring)."""
    defaults = {"model": demo.DEMO_MODEL, "dataset": str(first.output_dir / DEMO_DATA), "format": "auto",
                "epochs": 2, "eval_every": 0, "train_text_encoder": False,
                "batch_size": 16, "optimizer": "adamw",
                "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 20, "eval_before_training": True, "num_beams": 1,
                "max_new_tokens": 32, "log_every": 5, "num_workers": demo.LOADER_WORKERS,
                "feature_cache": "none"}
    if first.train_vision is not False:  # the tower trains unless the command line says --no-train-vision
        defaults.update(train_vision=True, vision_lr=3e-4)
    if first.optimizer == "adamw":
        defaults["embedding_eps"] = 3e-4
    return defaults


@demo.timed
def run_detection(cfg: TrainConfig) -> tuple[dict, int]:
    """Write the COCO export (and, for the demo's own model, its initial weights and the blind baseline), then
    train. Returns the run's summary and its steps."""
    d = distributed.setup(cfg.device)
    initial = cfg.output_dir / INITIAL_MODEL
    if d.is_main:
        if cfg.dataset == str(cfg.output_dir / DEMO_DATA):
            ensure_demo_pages(Path(cfg.dataset), seed=cfg.seed)
            blind_baseline(Path(cfg.dataset), cfg.output_dir / BLIND_BASELINE)
        if cfg.model == demo.DEMO_MODEL:
            demo.ensure_initial_model(initial, seed=cfg.seed, build=demo_detection_model)
    distributed.barrier(d)
    if cfg.model == demo.DEMO_MODEL:
        cfg = replace(cfg, model=str(initial))
    summary = fit(cfg)
    return summary, summary["steps"]


def ensure_demo_pages(folder: Path, seed: int, log=print) -> Path:
    """Write the COCO export once; a later run (or --resume) reuses it."""
    if (folder / "train" / "_annotations.coco.json").is_file():
        return folder
    log(f"writing the synthetic pages (COCO) to {folder} ...")
    return pages.write_coco(folder, {"train": TRAIN_PAGES, "valid": VALID_PAGES, "test": TEST_PAGES}, seed=seed)


def blind_baseline(folder: Path, out: Path, log=print) -> dict:
    """Score the image-blind guess (each category's mean training box on every page) on the valid split."""
    train, valid = (json.loads((folder / split / "_annotations.coco.json").read_text()) for split in ("train", "valid"))
    found = metrics.coco_eval(valid, pages.blind_predictions(train, valid), "bbox")
    result = {**{f"eval_{name}": value for name, value in found.items()},
              "what": "each category's mean training box on every valid page"}
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"image-blind baseline (each category's mean box) on the valid pages: mAP50 {found['map50']:.3f}, "
        f"mAP {found['map']:.3f}")
    return result


def location_embeddings(rows: int, dim: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """(rows, dim) embeddings, row k a smooth function of k: Gaussian bumps of k (one every LOCATION_SPACING rows, as
    wide), each on a random direction, plus noise (LOCATION_NOISE of the scale); each entry about `std`. Rows a few
    bins apart are nearly parallel, rows far apart nearly orthogonal."""
    k = torch.arange(rows, dtype=torch.float64)[:, None]  # (rows, 1)
    centres = torch.arange(0, rows + LOCATION_SPACING, LOCATION_SPACING, dtype=torch.float64)  # (C,)
    bumps = torch.exp(-0.5 * ((k - centres) / LOCATION_SPACING) ** 2)  # (rows, C)
    smooth = bumps @ torch.randn(len(centres), dim, generator=generator, dtype=torch.float64)  # (rows, dim)
    smooth = smooth / smooth.std()
    noise = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    mixed = math.sqrt(1 - LOCATION_NOISE ** 2) * smooth + LOCATION_NOISE * noise
    return (std * mixed / mixed.std()).float()


def demo_detection_model(processor, seed: int):
    """The DocVQA demo's model, its location-token rows initialized smoothly (`location_embeddings`)."""
    model = demo.demo_model(processor, seed=seed)
    first, last = processor.text_ids("<loc_0><loc_999>")[1:3]
    assert last - first == 999, (first, last)
    embedding = model.language_model.shared.weight
    generator = torch.Generator().manual_seed(seed)
    text = model.config.text
    with torch.no_grad():
        embedding[first:last + 1] = location_embeddings(1000, embedding.shape[1], text.init_std, generator)
        # positions as large as what they are added to (init_std alone is lost beside them)
        for table in (model.image_pos_embed.row_embeddings, model.image_pos_embed.column_embeddings):
            table.weight.mul_(IMAGE_POSITION_STD / table.weight.std())
        for part in (model.language_model.encoder, model.language_model.decoder):
            part.embed_positions.weight.mul_(text.init_std * text.d_model ** 0.5 / part.embed_positions.weight.std())
    return model
