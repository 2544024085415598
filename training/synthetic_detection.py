"""Synthetic document pages with labelled regions, written as a COCO export (the `<OD>` demo's data, tests).

    python -m training.synthetic_detection OUT_DIR [--train-pages 1200] [--valid-pages 64] [--test-pages 64]
                                                   [--seed 0]

Each page is drawn with PIL at 600x800 (the typeface and the table, stamp and signature styles of
training/synthetic.py), written at 300x400 (each pixel the mean of a 2x2 block, the boxes halved exactly), and holds 2-5
labelled regions among unlabelled lines of small print, each in a block of the page's layout (below the header, 3 rows
of 2 blocks; a table or a title may take a whole row), at a random size and place within it:
- `header`: a coloured band across the top of the page (on some pages), with the company's name in it;
- `title`: one large word (INVOICE, REPORT, ...);
- `table`: a ruled table with a dark header row and 2-6 zebra-shaded data rows;
- `stamp`: a coloured ring or double box around a word (PAID, RECEIVED, ...), slightly rotated;
- `signature`: a cursive scribble in dark ink.
The regions are large on purpose (at the demo's 192x192 a stamp is still 25-45 pixels), and their positions and sizes
vary, so a model must find them in the image: the mean box of each category scores far lower (see
`blind_predictions`).

The export is Roboflow's COCO layout, which the trainer's COCO reader finds with `--format auto`:
`OUT_DIR/{train,valid,test}/_annotations.coco.json` with the PNG pages beside each file; boxes are `[x, y, width,
height]` in pixels, category ids from 1. A page has at most one region of each category, and its annotations are
listed in the order of CATEGORIES, the order of the training targets: the decoder then writes, category by category,
whether the page has one and where (in reading order it would first have to find which region is the top one).
Everything is a function of (seed, split, page index), and each split draws from a stream of its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from .synthetic import (
    COMPANIES,
    HEADER_ROW,
    INK,
    ITEMS,
    PALETTE,
    REGIONS,
    SCAN_REDUCTION,
    SENTENCES,
    STAMP_WORDS,
    TITLES,
    ZEBRA,
    Box,
    font,
    money,
    write,
)

CATEGORIES = ("header", "title", "table", "stamp", "signature")
SPLITS = ("train", "valid", "test")
PAGE_SIZE = (600, 800)  # (width, height): the page as drawn, portrait; written at 1/SCAN_REDUCTION of it
HEADER_SHARE = 0.6  # pages with a header band
ROWS = 3  # rows of blocks below the header


def make_page(seed: int, split: str, index: int) -> tuple[Image.Image, list[tuple[str, Box]]]:
    """Page `index` of a split's stream: the image and its regions [(category, (x1, y1, x2, y2))], at most one of
    each category, in the order of CATEGORIES."""
    rng = random.Random(f"florence2-synthetic-detection/{seed}/{split}/{index}")
    width, height = PAGE_SIZE
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    regions: list[tuple[str, Box]] = []
    top = 0
    if rng.random() < HEADER_SHARE:
        band = rng.randint(50, 130)
        draw.rectangle((0, 0, width - 1, band - 1), fill=PALETTE[rng.choice(list(PALETTE))])
        write(draw, (rng.randint(24, 60), band // 2), rng.choice(COMPANIES).upper(), size=20, fill="white",
              anchor="lm", bold=True)
        regions.append(("header", (0, 0, width, band)))
        top = band
    wanted = rng.sample(CATEGORIES[1:], rng.randint(2 - len(regions), len(CATEGORIES) - 1))
    taken = [r[1] for r in regions]
    for category, (x, y, w, h) in place(rng, wanted, top):
        sample, draw_region = DRAW[category]
        rw, rh, params = sample(rng, w, h)
        at = (x + rng.randint(0, w - rw), y + rng.randint(0, h - rh))
        regions.append((category, draw_region(page, rng, at, rw, rh, params)))
        taken.append((x, y, x + w, y + h))
    draw_filler(draw, rng, taken, top)
    regions.sort(key=lambda r: CATEGORIES.index(r[0]))
    return page, regions


def place(rng: random.Random, wanted: list[str], top: int) -> list[tuple[str, Box]]:
    """The block of the page each wanted region goes in, as (x, y, width, height): below `top` the page is laid out
    in ROWS x 2 blocks (a table or a title may take a whole row), as forms and reports are; the region is drawn
    within its block at a random size and place."""
    width, height = PAGE_SIZE
    margin, gap = 20, 20
    block_w, block_h = (width - 2 * margin - gap) // 2, (height - top - 2 * margin - (ROWS - 1) * gap) // ROWS
    free = {(row, column) for row in range(ROWS) for column in range(2)}
    placed = []
    for category in rng.sample(wanted, len(wanted)):
        rows = [row for row in range(ROWS) if {(row, 0), (row, 1)} <= free]
        if category in ("table", "title") and rows and rng.random() < 0.5:
            row = rng.choice(rows)
            free -= {(row, 0), (row, 1)}
            placed.append((category, (margin, top + margin + row * (block_h + gap), width - 2 * margin, block_h)))
        else:
            row, column = rng.choice(sorted(free))
            free.discard((row, column))
            placed.append((category, (margin + column * (block_w + gap), top + margin + row * (block_h + gap),
                                      block_w, block_h)))
    return placed


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# Each region has a sampler, (rng, block width, block height) -> (width, height, what else the drawing needs), at
# most the block's size, and a drawer, which draws it at `at` (its top left) within width x height and returns the
# box its ink covers.
def sample_title(rng, w, h):
    word = rng.choice([t for titles in TITLES.values() for t in titles])
    fits = min(110, int(font(100).size * min(w / font(100).getlength(word), h / 100)))
    text_size = max(24, int(fits * rng.uniform(0.6, 1.0)))
    x1, y1, x2, y2 = font(text_size).getbbox(word, anchor="lt", stroke_width=1)
    return min(w, x2 - x1), min(h, y2 - y1), (word, text_size)


def draw_title(page, rng, at, w, h, params):
    word, text_size = params
    x1, y1, _, _ = font(text_size).getbbox(word, anchor="lt", stroke_width=1)
    draw = ImageDraw.Draw(page)
    xy = (at[0] - x1, at[1] - y1)
    draw.text(xy, word, font=font(text_size), fill=INK, anchor="lt", stroke_width=1, stroke_fill=INK)
    return draw.textbbox(xy, word, font=font(text_size), anchor="lt", stroke_width=1)


def sample_table(rng, w, h):
    row_height = rng.randint(24, 40)
    columns, rows = rng.randint(3, 5), rng.randint(2, max(2, min(6, h // row_height - 1)))
    row_height = min(row_height, h // (rows + 1))
    return int(w * rng.uniform(0.7, 1.0)), (rows + 1) * row_height, (columns, rows, row_height)


def draw_table(page, rng, at, w, h, params):
    """A dark header row, zebra-shaded data rows, ruled, with vertical lines."""
    columns, rows, row_height = params
    draw = ImageDraw.Draw(page)
    x, y = at
    widths = [w - (columns - 1) * (w // (columns + 1))] + [w // (columns + 1)] * (columns - 1)
    edges = [x + sum(widths[:i]) for i in range(columns + 1)]
    draw.rectangle((x, y, x + w, y + row_height), fill=HEADER_ROW)
    for left, name in zip(edges, ("Item", "Qty", "Q1", "Q2", "Total")):
        write(draw, (left + 6, y + row_height // 2), name, size=13, bold=True, fill="white", anchor="lm")
    for i in range(rows):
        top = y + (i + 1) * row_height
        if i % 2:
            draw.rectangle((x, top, x + w, top + row_height), fill=ZEBRA)
        write(draw, (x + 6, top + row_height // 2), rng.choice(ITEMS + REGIONS)[: max(4, widths[0] // 9)], size=13,
              anchor="lm")
        for right in edges[2:]:
            write(draw, (right - 6, top + row_height // 2), money(rng.randint(100, 99999) / 100), size=12,
                  anchor="rm")
        draw.line((x, top + row_height, x + w, top + row_height), fill=INK, width=2)
    bottom = y + (rows + 1) * row_height
    for edge in edges:
        draw.line((edge, y, edge, bottom), fill=INK, width=2)
    return x, y, x + w + 1, bottom + 1


def sample_stamp(rng, w, h):
    side = int(min(w, h) * rng.uniform(0.6, 0.95))
    return side, side, None


def draw_stamp(page, rng, at, w, h, params):
    """A ring (or a double-bordered box) around the word, rotated by up to 15 degrees."""
    word = rng.choice(STAMP_WORDS)
    color = (*PALETTE[rng.choice(("red", "blue", "purple", "green"))], 255)
    inner = int(w / math.sqrt(2)) - 2  # the stamp before rotation; rotated it fits in w x w
    stamp = Image.new("RGBA", (inner, inner), (0, 0, 0, 0))
    draw = ImageDraw.Draw(stamp)
    text_size = max(14, min(32, int(inner / (0.62 * len(word) + 1.2))))
    if rng.random() < 0.5:
        draw.ellipse((2, 2, inner - 3, inner - 3), outline=color, width=6)
        draw.ellipse((12, 12, inner - 13, inner - 13), outline=color, width=2)
    else:
        half = inner // 3
        draw.rectangle((2, inner // 2 - half, inner - 3, inner // 2 + half), outline=color, width=6)
        draw.rectangle((10, inner // 2 - half + 8, inner - 11, inner // 2 + half - 8), outline=color, width=2)
    draw.text((inner // 2, inner // 2), word, font=font(text_size), fill=color, anchor="mm", stroke_width=1,
              stroke_fill=color)
    rotated = stamp.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BICUBIC, expand=True)
    x, y = at[0] + (w - rotated.width) // 2, at[1] + (h - rotated.height) // 2
    page.paste(rotated, (x, y), rotated)
    return ink_box(rotated, (x, y))


def ink_box(layer: Image.Image, at: tuple[int, int]) -> Box:
    """The box of a pasted layer's visible pixels, in page coordinates."""
    x1, y1, x2, y2 = layer.getchannel("A").point(lambda a: 255 if a > 40 else 0).getbbox()
    return at[0] + x1, at[1] + y1, at[0] + x2, at[1] + y2


def sample_signature(rng, w, h):
    width = int(w * rng.uniform(0.65, 0.95))
    return width, min(h, int(width * rng.uniform(0.3, 0.45))), None


def draw_signature(page, rng, at, w, h, params):
    """Loops along a drifting baseline, then an underline flourish, 3-4 px wide."""
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    ink = (*rng.choice(((20, 30, 120), INK, (10, 60, 30))), 255)
    loops, amplitude, stroke = rng.randint(4, 7), (h - 14) / 2.4, rng.randint(3, 4)
    points = []
    for step in range(160):
        t = step / 159
        angle = 2 * math.pi * loops * t
        points.append((8 + (w - 30) * t + 0.06 * w * math.cos(angle),
                       (h - 10) / 2 - amplitude * math.sin(angle) * (0.6 + 0.4 * math.sin(3 * t + loops))))
    draw.line(points, fill=ink, width=stroke, joint="curve")
    draw.line((4, h - 8, w / 2, h - 4, w - 4, h - 12), fill=ink, width=stroke, joint="curve")
    page.paste(layer, at, layer)
    return ink_box(layer, at)


DRAW = {"title": (sample_title, draw_title), "table": (sample_table, draw_table),
        "stamp": (sample_stamp, draw_stamp), "signature": (sample_signature, draw_signature)}


def draw_filler(draw: ImageDraw.ImageDraw, rng: random.Random, taken: list[Box], top: int) -> None:
    """Unlabelled lines of small print wherever they cover no region: the page around the regions."""
    width, height = PAGE_SIZE
    for _ in range(rng.randint(4, 14)):
        x, y = rng.randint(24, width // 2), rng.randint(top + 12, height - 30)
        text = rng.choice(SENTENCES)
        length = int(draw.textlength(text, font=font(13)))
        line = (x, y, x + length, y + 16)
        if line[2] < width - 20 and not any(overlaps(line, other) for other in taken):
            write(draw, (x, y), text, size=13)
            taken.append(line)


# ------------------------------------------------------------------------------------------ COCO export, CLI
def coco_split(folder: Path, seed: int, split: str, pages: int) -> dict:
    """Draw a split's pages into `folder` and return its COCO dictionary. The pages are drawn in a process per core:
    each is a function of (seed, split, index) alone, so the export is the same with any number of them."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    images, annotations = [], []
    draw = functools.partial(draw_page_file, folder, seed, split)
    with concurrent.futures.ProcessPoolExecutor() as pool:  # a process per core
        drawn = list(pool.map(draw, range(pages), chunksize=64))
    for index, (name, (width, height), regions) in enumerate(drawn):
        images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        for category, (x1, y1, x2, y2) in regions:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": ids[category],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"info": {"description": f"synthetic document regions, seed {seed}, split {split}"},
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name, "supercategory": "document"} for name, i in ids.items()]}


def draw_page_file(folder: Path, seed: int, split: str, index: int) -> tuple[str, tuple[int, int], list]:
    """Draw page `index` of a split into `folder`, written at 1/SCAN_REDUCTION of its drawn size: its file name,
    written size and regions (in the written page's pixels)."""
    image, regions = make_page(seed, split, index)
    image = image.reduce(SCAN_REDUCTION)  # each written pixel the mean of a 2x2 block: exact box scaling
    name = f"{split}-{index:05d}.png"
    image.save(folder / name)
    return name, image.size, [(category, tuple(v / SCAN_REDUCTION for v in box)) for category, box in regions]


def write_coco(out_dir: str | Path, counts: dict[str, int], seed: int) -> Path:
    """Write `{split: pages}` as OUT_DIR/<split>/_annotations.coco.json and its images (aside, then renamed into
    place, so an interrupted run leaves no half-written export). An existing OUT_DIR is an error."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose another folder or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for split, pages in counts.items():
            data = coco_split(staging / split, seed, split, pages)
            (staging / split / "_annotations.coco.json").write_text(json.dumps(data))
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def blind_predictions(train: dict, evaluated: dict) -> list[dict]:
    """The image-blind baseline: on every evaluated image, each category's mean training box (in relative
    coordinates), scored by how often the category occurs. COCO results ({image_id, category_id, bbox, score})."""
    sums: dict[int, list[float]] = {}
    sizes = {image["id"]: (image["width"], image["height"]) for image in train["images"]}
    for a in train["annotations"]:
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        s = sums.setdefault(a["category_id"], [0.0] * 5)
        for i, v in enumerate((x / w, y / h, bw / w, bh / h, 1.0)):
            s[i] += v
    results = []
    for image in evaluated["images"]:
        for category, (x, y, bw, bh, n) in sums.items():
            results.append({"image_id": image["id"], "category_id": category, "score": n / len(train["images"]),
                            "bbox": [x / n * image["width"], y / n * image["height"], bw / n * image["width"],
                                     bh / n * image["height"]]})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.synthetic_detection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write (must not exist)")
    parser.add_argument("--train-pages", type=int, default=1200)
    parser.add_argument("--valid-pages", type=int, default=64)
    parser.add_argument("--test-pages", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = {"train": args.train_pages, "valid": args.valid_pages, "test": args.test_pages}
    try:
        write_coco(args.out_dir, counts, args.seed)
    except FileExistsError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {args.out_dir}: " + ", ".join(f"{split} {n} pages" for split, n in counts.items()))


if __name__ == "__main__":
    main()
