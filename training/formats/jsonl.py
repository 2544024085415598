"""JSONL: one {"image": file name, "prefix": prompt, "suffix": target} object per line, as maestro and Roboflow's
Florence-2 export write them. The prefix and suffix are used as they are, for any task ("<OD>" and
"car<loc_12><loc_80><loc_330><loc_701>", "<DocVQA>What is the total?" and "$12.00", ...).

A split is `<name>/annotations.jsonl` with its images beside it (Roboflow, maestro), or `<name>.jsonl` with the
images beside it or in `images/`; `--dataset` may also be one .jsonl file (its one split).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import Problems, Sample, Split, image_size_of, missing_split, split_names

FILE_NAME = "annotations.jsonl"  # Roboflow's and maestro's name
KEYS = ("image", "prefix", "suffix")


def split_file(root: Path, split: str) -> Path | None:
    if root.is_file():
        return root
    for name in split_names(split):
        for candidate in (root / name / FILE_NAME, root / f"{name}.jsonl"):
            if candidate.is_file():
                return candidate
    return None


def looks_like_jsonl(root: Path) -> bool:
    return any(root.glob(f"*/{FILE_NAME}")) or any(root.glob("*.jsonl"))


def read_jsonl(root: Path, split: str, problems: Problems) -> Split:
    path = split_file(root, split)
    if path is None:
        found = [p.parent.name for p in root.glob(f"*/{FILE_NAME}")] + [p.stem for p in root.glob("*.jsonl")]
        raise missing_split(split, root, found)
    folders = [path.parent, path.parent / "images"]
    samples = []
    with open(path, encoding="utf-8-sig", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add(where, f"not a JSON object ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in KEYS):
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                problems.add(where, f"a line needs string values for {', '.join(KEYS)} (it has {found})")
                continue
            file = next((folder / row["image"] for folder in folders if (folder / row["image"]).is_file()), None)
            if file is None:
                problems.add(where, f"image {row['image']!r} not found beside {path.name}")
                continue
            try:
                size = image_size_of(file)
            except OSError as e:
                problems.add(where, f"cannot read {file} as an image ({e})")
                continue
            samples.append(Sample(str(file), number, where, size, prefix=row["prefix"], suffix=row["suffix"]))
    return Split(samples, {}, problems.items, f"jsonl: {path}")
