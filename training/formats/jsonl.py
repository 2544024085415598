"""JSONL: one {"image": file name, "prefix": prompt, "suffix": target} object per line, as maestro and Roboflow's
Florence-2 export write them. The prefix and suffix are used as they are, for any task ("<OD>" and
"car<loc_12><loc_80><loc_330><loc_701>", "<DocVQA>What is the total?" and "$12.00", ...).

A split is `<name>/annotations.jsonl` with its images beside it (Roboflow's Florence-2 export, maestro), or
`<name>.jsonl` or `_annotations.<name>.jsonl` (Roboflow's PaliGemma export, the same keys) with the images beside it
or in `images/`; `--dataset` may also be one .jsonl file (its one split). A line that is not UTF-8 JSON with the
three strings is skipped and counted with its file and line.
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
        for candidate in (root / name / FILE_NAME, root / f"{name}.jsonl", root / f"_annotations.{name}.jsonl"):
            if candidate.is_file():
                return candidate
    return None


def looks_like_jsonl(root: Path) -> bool:
    return any(root.glob(f"*/{FILE_NAME}")) or any(root.glob("*.jsonl"))


def read_jsonl(root: Path, split: str, problems: Problems) -> Split:
    path = split_file(root, split)
    if path is None:
        found = [p.parent.name for p in root.glob(f"*/{FILE_NAME}")] + [
            p.stem.removeprefix("_annotations.") for p in root.glob("*.jsonl")]
        raise missing_split(split, root, found)
    folders = [path.parent, path.parent / "images"]
    samples = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            line = decoded(raw, number, where, problems)
            if line is None or not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add(where, f"not a JSON object ({e.msg.removesuffix(' at')} at column {e.colno})")
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


def decoded(raw: bytes, number: int, where: str, problems: Problems) -> str | None:
    """A line as text: UTF-8 (JSON's encoding), without the byte-order mark some editors put at the file's start.
    A line in another encoding is a bad line, not one read with its letters replaced (a target silently changed)."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.add(where, f"not UTF-8 text (byte {raw[e.start]:#04x}, the line's byte {e.start + 1})")
        return None
