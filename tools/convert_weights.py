"""Convert a Florence-2 checkpoint between Microsoft's layout and transformers' own Florence-2.

    python tools/convert_weights.py SRC DST --to {microsoft,transformers} [--dtype float32|float16|bfloat16]
        [--drop-final-logits-bias] [--overwrite] [--revision REV]

SRC is a checkpoint folder or a hub id, in either layout (microsoft/Florence-2-*, florence-community/Florence-2-*,
fine-tunes of either); `pytorch_model.bin` and sharded files are read too. DST gets `model.safetensors` (the tied
embedding once), `config.json`, and the tokenizer and processor files that side loads with:
- microsoft: tokenizer.json, tokenizer_config.json, preprocessor_config.json (the source's own when it is in
  Microsoft's layout, else derived from the source's or the package's shipped ones);
- transformers: the tokenizer with the 1024 Florence tokens and `<image>`, preprocessor_config.json (with
  `image_seq_length`), processor_config.json and generation_config.json, so that `AutoProcessor` and
  `Florence2ForConditionalGeneration.from_pretrained(DST)` work offline.
The source is read by florence2.model.load_state, as Florence2.from_pretrained reads it (florence2.weights.KEY_MAP,
every tensor checked); florence2.transformers_layout writes the transformers side. Every file is written atomically;
an existing non-empty DST is refused unless --overwrite. A mistake (a missing checkpoint, a bad folder, a bad flag)
ends in one line on stderr and exit status 1 (2 for a bad flag).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from florence2 import cli, weights
from florence2 import transformers_layout as tl
from florence2.config import read_json
from florence2.hub import resolve_checkpoint
from florence2.model import load_state
from florence2.processor import ASSETS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SIDE_FILES = {  # the tokenizer/processor files each layout's loaders read, copied as they are within a layout
    "microsoft": ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "vocab.json", "merges.txt"),
    "transformers": ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                     "generation_config.json", "special_tokens_map.json", "chat_template.jinja"),
}
SOURCE_FILES = ("config.json", *sorted(set(SIDE_FILES["microsoft"] + SIDE_FILES["transformers"])))


def convert(src, dst, to: str, dtype: str | torch.dtype | None = None, *, drop_final_logits_bias: bool = False,
            overwrite: bool = False, revision: str | None = None) -> Path:
    """Convert checkpoint `src` (folder or hub id, either layout) into folder `dst` in layout `to`.
    `dtype` casts the floating-point tensors (default: keep the stored dtype). Returns `dst`."""
    if to not in ("microsoft", "transformers"):
        raise ValueError(f"unknown target layout {to!r}; use 'microsoft' or 'transformers'")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
    dst = Path(dst)
    folder = resolve_checkpoint(src, revision, files=SOURCE_FILES)
    _check_destination(dst, folder, overwrite)

    config, layout, ours = load_state(folder, dtype)
    state = tl.to_layout(ours, to, config, drop_final_logits_bias=drop_final_logits_bias)
    stored_dtype = str(ours[weights.SHARED].dtype).removeprefix("torch.")
    files = side_files(folder, layout, to, config)
    if to == "transformers":
        files["generation_config.json"] = files.get("generation_config.json") or tl.generation_config(config)
        config_json = tl.to_transformers_config(config, dtype=stored_dtype)
    else:
        config_json = {**config.to_dict(), "torch_dtype": stored_dtype}

    dst.mkdir(parents=True, exist_ok=True)  # everything is checked and built: now write
    weights.save_weights(state, dst / "model.safetensors")
    for name, content in files.items():
        _write(dst / name, content)
    _write(dst / "config.json", config_json)  # last: a folder without it is visibly incomplete
    return dst


def side_files(folder: Path, layout: str, to: str, config) -> dict[str, dict | Path]:
    """Tokenizer and processor files for layout `to`: name -> JSON content, or a file to copy as it is."""
    own = {}  # within a layout, the source's own files, where it has them; derived ones fill in the rest
    if layout == to:
        own = {name: folder / name for name in SIDE_FILES[to] if (folder / name).is_file()}
    def json_file(where: Path, name: str) -> dict | None:
        return read_json(where / name, required=False)

    tokenizer = json_file(folder, "tokenizer.json") or json_file(ASSETS, "tokenizer.json")
    tokenizer_config = json_file(folder, "tokenizer_config.json") or {}
    preprocessor = (json_file(folder, "preprocessor_config.json")
                    or (json_file(folder, "processor_config.json") or {}).get("image_processor")
                    or json_file(ASSETS, "preprocessor_config.json"))
    vocab_size = config.text.vocab_size
    if to == "transformers":
        derived = {"tokenizer.json": tl.transformers_tokenizer(tokenizer, vocab_size),
                   "tokenizer_config.json": tl.transformers_tokenizer_config(tokenizer_config),
                   "preprocessor_config.json": tl.transformers_preprocessor_config(preprocessor, config),
                   "processor_config.json": tl.transformers_processor_config()}
    else:
        derived = {"tokenizer.json": tl.microsoft_tokenizer(tokenizer, vocab_size),
                   "tokenizer_config.json": tl.microsoft_tokenizer_config(tokenizer_config),
                   "preprocessor_config.json": tl.microsoft_preprocessor_config(
                       preprocessor, json_file(ASSETS, "preprocessor_config.json"))}
    return {**derived, **own}


def _check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")
    if dst.is_dir() and dst.resolve() == src.resolve():
        raise FileExistsError(f"{dst} is the source folder: convert into a new folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty; choose a new folder, or pass --overwrite to "
                                  "replace the files the conversion writes (other files are left alone)")
        stale = [p.name for p in dst.iterdir() if p.name in weights.WEIGHT_FILES and p.name != "model.safetensors"]
        if stale:
            raise FileExistsError(f"{dst} holds other weight files ({', '.join(stale)}) that loaders would mix up "
                                  "with the converted model.safetensors; remove them first")


def _write(path: Path, content: dict | Path) -> None:
    if isinstance(content, Path):
        weights.atomic_write(path, lambda tmp: shutil.copyfile(content, tmp))
    else:
        # tokenizer.json (3.7 MB) compact: the indenting encoder is pure Python and slow
        indent = None if path.name == "tokenizer.json" else 2
        text = json.dumps(content, indent=indent, ensure_ascii=False) + "\n"
        weights.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="convert_weights.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint folder or hub id, in Microsoft's or transformers' layout")
    p.add_argument("dst", help="output folder (new or empty)")
    p.add_argument("--to", required=True, choices=["microsoft", "transformers"], help="layout to write")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast the weights (default: keep)")
    p.add_argument("--drop-final-logits-bias", action="store_true",
                   help="convert to transformers even if final_logits_bias is not zero (it is dropped: not exact)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST, replacing the files written")
    p.add_argument("--revision", default=None, help="hub revision of SRC")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.dtype, drop_final_logits_bias=args.drop_final_logits_bias,
                      overwrite=args.overwrite, revision=args.revision)
    except cli.USER_ERRORS as e:  # CheckpointError and ConfigError are ValueErrors
        return cli.report(p.prog, e)
    print(f"wrote {args.to} layout to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
