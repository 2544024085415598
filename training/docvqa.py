"""Fine-tune Florence-2 on DocVQA (or any dataset of the same shape): the DocVQA preset of training.finetune.

    python -m training.docvqa --output-dir runs/docvqa                   # the blog's recipe, on the hub data
    python -m training.docvqa --preset demo --output-dir runs/demo       # offline: synthetic documents, small model
    torchrun --nproc_per_node=8 -m training.docvqa --output-dir runs/x  # data-parallel on 8 GPUs

Defaults are the recipe of the Hugging Face blog "Fine-tuning Florence-2" (Florence-2-base-ft, DocumentVQA, prompt
"<DocVQA>" + question, target answers[0], AdamW lr 1e-6 with linear decay and no warm-up, 7 epochs, batch 6),
without its bugs: the vision tower is really frozen (requires_grad False, and run in eval mode), padding is neither
attended nor counted in the loss, and ANLS is the official one.
"""

from __future__ import annotations

from . import finetune

COMMAND = {"prog": "python -m training.docvqa", "description": __doc__, "task": "<DocVQA>", "preset": "blog"}


def parse_args(argv=None):
    return finetune.parse_args(argv, COMMAND)


def main(argv=None) -> dict:
    return finetune.main(argv, COMMAND)


if __name__ == "__main__":
    main()
