"""Sliced against whole-page <OD>: COCO mAP50 on pages made of 2x2 detection demo pages.

    python tools/sliced_map.py --model RUN/best [--pages 128] [--slice 800x600] [--overlaps 0 0.2] [--out FILE]

The pages are the detection demo's held-out test pages (training/synthetic_detection.py: seed 0, split "test",
600x800 each, the ones `python -m training.finetune --preset demo --task "<OD>"` writes to demo-data/test), four to
a 1200x1600 page, their regions moved with them. Each big page is answered
- whole: `Florence2.predict` on the page (the model sees it at its image size, each demo page at a quarter of it);
- sliced: `florence2.sahi.sliced_answer`, what `--slice` does on the command lines (SAHI's slices, the whole page
  also read, GREEDYNMM over IOS 0.5), once per overlap; and the same without the whole page's boxes
  ("slices_only", --slice-only);
and, for reference, each demo page alone (what the demo's own evaluation measures). mAP, mAP50 and mAP75 are
pycocotools' through training/metrics.py's `coco_map`, the categories the ground truth's. Generation as the demo
evaluates (greedy, at most 32 new tokens) unless told otherwise. Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from florence2 import Florence2
from florence2.slicing import parse_slice
from training import metrics
from training.synthetic_detection import PAGE_SIZE, make_page

TASK = "<OD>"


def big_pages(count: int, seed: int, split: str) -> tuple[list[Image.Image], list[list]]:
    """`count` demo pages as count // 4 pages of 2x2, and each big page's regions [(category, box)] on it."""
    width, height = PAGE_SIZE
    pages, truths = [], []
    for first in range(0, count - count % 4, 4):
        page = Image.new("RGB", (2 * width, 2 * height), "white")
        truth = []
        for k in range(4):
            image, regions = make_page(seed, split, first + k)
            dx, dy = (k % 2) * width, (k // 2) * height
            page.paste(image, (dx, dy))
            truth += [(name, (x1 + dx, y1 + dy, x2 + dx, y2 + dy)) for name, (x1, y1, x2, y2) in regions]
        pages.append(page)
        truths.append(truth)
    return pages, truths


def score(answers: list[dict], truths: list[list], size: tuple[int, int]) -> dict:
    """COCO mAPs of <OD> answers against the regions."""
    records = [{"query": i, "width": size[0], "height": size[1], "file_name": f"page-{i}.png"}
               for i in range(len(answers))]

    def truth_and_predictions(record):
        answer = answers[record["query"]][TASK]
        truth = [{"label": name, "box": list(box), "crowd": False} for name, box in truths[record["query"]]]
        predicted = [{"label": label, "box": box, "score": s}
                     for box, label, s in zip(answer["bboxes"], answer["labels"], answer["scores"])]
        return truth, predicted

    found, _ = metrics.coco_map(records, truth_and_predictions, "bbox", None)
    return {name: round(found[name], 4) for name in ("map", "map50", "map75")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the detection demo's checkpoint (RUN/best)")
    p.add_argument("--pages", type=int, default=128, help="demo pages to use, four per big page")
    p.add_argument("--seed", type=int, default=0, help="the demo data's seed (the demo's default: 0)")
    p.add_argument("--split", default="test")
    p.add_argument("--slice", type=parse_slice, default=(PAGE_SIZE[1], PAGE_SIZE[0]), metavar="S|HxW",
                   help="slice size (default: a demo page, 800x600)")
    p.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.2])
    p.add_argument("--batch-size", type=int, default=8, help="images (or slices) per generate call")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    from florence2.sahi import sliced_answer

    model = Florence2.from_pretrained(args.model, device="cpu")
    options = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    pages, truths = big_pages(args.pages, args.seed, args.split)
    width, height = PAGE_SIZE
    started = time.time()
    result = {"model": args.model, "demo_pages": 4 * len(pages), "big_pages": len(pages),
              "big_page_size": [2 * width, 2 * height], "slice_hxw": list(args.slice), "generate": options,
              "torch": torch.__version__, "python": platform.python_version()}
    singles = [make_page(args.seed, args.split, i) for i in range(4 * len(pages))]
    answers = []
    for start in range(0, len(singles), args.batch_size):
        answers += model.predict([image for image, _ in singles[start:start + args.batch_size]], TASK, **options)
    result["each_demo_page_alone"] = score(answers, [regions for _, regions in singles], PAGE_SIZE)
    answers = []
    for start in range(0, len(pages), args.batch_size):
        answers += model.predict(pages[start:start + args.batch_size], TASK, **options)
    result["whole_big_page"] = score(answers, truths, (2 * width, 2 * height))
    for overlap in args.overlaps:
        answers = [sliced_answer(model, page, TASK, None, args.slice, overlap, batch_size=args.batch_size, **options)
                   for page in pages]
        result[f"sliced_overlap_{overlap}"] = score(answers, truths, (2 * width, 2 * height))
        answers = [sliced_answer(model, page, TASK, None, args.slice, overlap, whole_page=False,
                                 batch_size=args.batch_size, **options) for page in pages]
        result[f"sliced_overlap_{overlap}_slices_only"] = score(answers, truths, (2 * width, 2 * height))
    result["seconds"] = round(time.time() - started, 1)
    import sahi

    result["sahi"] = sahi.__version__
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
