"""Presets: named sets of defaults for a task, applied before the command line is parsed (an explicit flag always
wins), with an optional orchestration of the run (the offline demos pretrain before they fine-tune).

A preset is keyed by (name, task): `--preset demo --task "<DocVQA>"` and `--preset demo --task "<OD>"` are two
presets. To add one, add a `Preset` to PRESETS: `defaults(first)` returns the flags' new defaults, given what the
command line asks for (`first`: its flags over the parser's defaults, e.g. first.output_dir, first.optimizer; a
switch not given is None there, to tell it from its `--no-` form);
`run(config)` runs it (default: the trainer's `fit`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from . import demo, demo_detection
from .config import TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    task: str
    help: str
    defaults: Callable[[argparse.Namespace], dict]
    run: Callable[[TrainConfig], dict] | None = None


PRESETS: dict[tuple[str, str], Preset] = {(p.name, p.task): p for p in (
    Preset("blog", "<DocVQA>", "the defaults: the recipe of the Hugging Face blog 'Fine-tuning Florence-2'",
           lambda first: {}),
    Preset("demo", "<DocVQA>", "offline run on synthetic documents with a small model, pretrained from scratch on "
           "captions of other synthetic pages, then fine-tuned on its questions with the tower frozen, on a 2-core "
           "CPU in about 8 minutes",
           demo.docvqa_defaults, demo.run_docvqa),
    Preset("demo", "<OD>", "offline run: synthetic document pages with labelled regions (header, title, table, stamp, "
           "signature) written as a COCO export, and a small model trained on them from scratch, on a 2-core CPU in "
           "about 11 minutes",
           demo_detection.detection_defaults, demo_detection.run_detection),
)}
