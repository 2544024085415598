"""Fine-tune Florence-2 on any task, from the formats people already have.

    python -m training.finetune --task "<OD>" --dataset data/ --output-dir runs/od          # COCO, YOLO, JSONL, hf
    python -m training.finetune --task "<CAPTION>" --dataset coco-captions/ --output-dir runs/cap --lr 5e-6
    torchrun --nproc_per_node=8 -m training.finetune --task "<OCR_WITH_REGION>" --dataset ocr/ --output-dir runs/x

The recipe defaults are those of `python -m training.docvqa` (the Hugging Face blog's: Florence-2-base-ft, AdamW at
lr 1e-6 with linear decay, 7 epochs, batch 6, the vision tower frozen); --format auto tells COCO, JSONL, YOLO and
Hugging Face datasets apart by their files. `--help` lists every option; the README has a section per kind of task.
"""

from __future__ import annotations

import sys

from .config import parse_config
from .presets import PRESETS
from .setup import USER_ERRORS, check_extras
from .tasks import get_task
from .trainer import fit

COMMAND = {"prog": "python -m training.finetune", "description": __doc__, "task": None, "preset": None}


def parse_args(argv=None, command: dict = COMMAND):
    """The TrainConfig of a command line (flag errors end the program, as argparse does)."""
    return parse_config(argv, presets=PRESETS, **command)


def main(argv=None, command: dict = COMMAND) -> dict:
    """Parse the command line and run it; a user's mistake ends with one line and exit status 1."""
    cfg = parse_args(argv, command)
    try:
        return run(cfg)
    except USER_ERRORS as e:
        sys.exit(f"{command['prog']}: error: {e}")


def run(cfg) -> dict:
    """Check the extras the run needs, then run its preset's orchestration, or `fit`."""
    packages = ["datasets", "Levenshtein", "tqdm", "matplotlib", *get_task(cfg.task, cfg.prompt_template).extras]
    check_extras(packages + (["peft"] if cfg.lora else []) + (["yaml"] if cfg.format in ("yolo", "auto") else []))
    preset = PRESETS.get((cfg.preset, cfg.task))
    return (preset.run if preset is not None and preset.run is not None else fit)(cfg)


if __name__ == "__main__":
    main()
