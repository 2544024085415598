"""Export a Florence-2 to ONNX, laid out as onnx-community publishes it and transformers.js loads it.

    python -m florence2.export MODEL OUT_DIR [--dtype fp32|fp16] [--quantize int8] [--adapter PATH] [--overwrite]

MODEL is anything `Florence2.from_pretrained` loads (a hub id or a folder, either layout; fine-tunes and LoRA
merges are ordinary checkpoints), optionally with a peft adapter merged in. OUT_DIR gets:

    onnx/vision_encoder.onnx  onnx/embed_tokens.onnx  onnx/encoder_model.onnx  onnx/decoder_model_merged.onnx
        (`_fp16` with --dtype fp16: float16 weights and arithmetic, float32 inputs and outputs;
         `_quantized` beside them with --quantize int8: int8 weights, made from the float32 graphs)
    config.json             the checkpoint's config (Microsoft's layout) with text_config.model_type, from which
                            transformers.js takes the decoder's layers and heads
    generation_config.json  the checkpoint's decoding defaults
    preprocessor_config.json, tokenizer.json, tokenizer_config.json
                            the checkpoint's image settings and tokenizer, plus the task prompts that
                            transformers.js' Florence2Processor reads

The graphs, their inputs and outputs are described in `florence2.export.graphs`; `OnnxFlorence2` runs a folder
under onnxruntime. onnx and onnxruntime are the optional extra `export`: imported only here.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import cli, weights
from ..postprocess import PARSE_TYPES, TASKS_WITH_INPUT, TASKS_WITHOUT_INPUT
from .graphs import GRAPHS

DTYPES = ("fp32", "fp16")
QUANTIZATIONS = ("int8",)
VARIANTS = {"fp32": "", "fp16": "_fp16", "int8": "_quantized"}  # variant -> file suffix, transformers.js' names
TEXT_MODEL_TYPE = "florence2_language"  # text_config.model_type, as Microsoft's remote code names it
INSTALL_HINT = 'pip install -e ".[export]"'


def require_export_extra() -> None:
    """Fail at once, with the line that fixes it, when onnx or onnxruntime is missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"exporting to ONNX needs {' and '.join(missing)}: {INSTALL_HINT}")


def export(model, out_dir: str | os.PathLike, *, dtype: str = "fp32", quantize: str | None = None,
           adapter: str | os.PathLike | None = None, revision: str | None = None, overwrite: bool = False,
           processor=None) -> Path:
    """Export `model` (a Florence2, or anything Florence2.from_pretrained loads) into `out_dir`. Returns out_dir.

    dtype "fp32" writes onnx/*.onnx, "fp16" onnx/*_fp16.onnx; quantize="int8" adds onnx/*_quantized.onnx. The image
    size of the graphs is the processor's (the checkpoint's preprocessor_config.json). A non-empty out_dir is
    refused unless overwrite=True, which replaces only the files the export writes."""
    require_export_extra()
    from ..model import Florence2
    from ..predict import default_processor
    from ..processor import Florence2Processor
    from . import graphs

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; use {', '.join(QUANTIZATIONS)}")
    out = Path(out_dir)
    variants = [dtype] + ([quantize] if quantize else [])  # keys of VARIANTS
    graph_files = [f"{graph}{VARIANTS[v]}.onnx" for v in variants for graph in GRAPHS]
    _check_destination(out, overwrite, graph_files)
    if isinstance(model, Florence2):
        if adapter is not None:
            raise ValueError("adapter= is for a checkpoint path; merge it when loading: "
                             "Florence2.from_pretrained(base, adapter=...)")
        processor = processor or default_processor(model)
        model = copy.deepcopy(model).to("cpu", dtype=torch.float32)  # the caller's model keeps device and mode
    else:
        source = model
        kwargs = {"adapter": adapter} if adapter is not None else {}
        model = Florence2.from_pretrained(source, revision=revision, **kwargs)
        processor = processor or Florence2Processor.from_pretrained(source, revision=revision)
    model.eval()
    image_size = processor.image_size
    _check_image_size(model.config, image_size)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        paths = graphs.export_graphs(model, staging, image_size)
        make = {"fp16": graphs.to_fp16, "int8": graphs.quantize_int8}  # from the fp32 graph
        files = {f"{name}{VARIANTS[v]}.onnx": make[v](path, staging) if v in make else path  # name in onnx/ -> file
                 for name, path in paths.items() for v in variants}
        (out / "onnx").mkdir(exist_ok=True)
        for name, path in files.items():
            os.replace(path, out / "onnx" / name)
        side = side_files(model.config, processor, dtype, quantize)
        mode = 0o666 & ~_umask()  # readable as any new file (a web server serves the folder), not mkstemp's 0600
        for name in sorted(side, key=lambda n: n == "config.json"):  # config.json last: incomplete without it
            content = side[name]
            text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"

            def write(tmp: Path, text: str = text) -> None:
                tmp.write_text(text, encoding="utf-8")
                os.chmod(tmp, mode)

            weights.atomic_write(out / name, write)
    except BaseException:
        if created:  # a folder of ours: nothing half-written is left behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def side_files(config, processor, dtype: str, quantize: str | None) -> dict[str, dict | str]:
    """config.json, generation_config.json and the processor files of the exported folder: name -> content."""
    from ..transformers_layout import NOT_CARRIED_TO_TRANSFORMERS, generation_config

    config_json = {k: v for k, v in config.to_dict().items() if k not in NOT_CARRIED_TO_TRANSFORMERS}
    config_json.pop("torch_dtype", None)
    config_json["text_config"]["model_type"] = TEXT_MODEL_TYPE
    if dtype != "fp32":  # transformers.js picks fp32 files by default (q8 in the browser's wasm): point it to ours
        js = {"dtype": dtype}
        if quantize == "int8":
            js["device_config"] = {"wasm": {"dtype": "q8"}}
        config_json["transformers.js_config"] = js
    preprocessor = {**processor.image_settings.to_config(),
                    # what transformers.js' Florence2Processor reads to build prompts and parse answers
                    "task_prompts_without_inputs": dict(TASKS_WITHOUT_INPUT),
                    "task_prompts_with_input": dict(TASKS_WITH_INPUT),
                    "tasks_answer_post_processing_type": dict(PARSE_TYPES)}
    tokenizer_config = {"tokenizer_class": "BartTokenizer", "model_max_length": processor.model_max_length,
                        "add_prefix_space": False, "clean_up_tokenization_spaces": True, "errors": "replace",
                        "trim_offsets": True, "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                        "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
    return {"config.json": config_json, "generation_config.json": generation_config(config),
            "preprocessor_config.json": preprocessor, "tokenizer_config.json": tokenizer_config,
            "tokenizer.json": processor.tokenizer.to_str()}


def _check_image_size(config, image_size: tuple[int, int]) -> None:
    """The graphs take images of the processor's size: it must fit the model's position tables."""
    height, width = image_size
    grid = (config.vision.grid_size(height), config.vision.grid_size(width))
    if max(grid) > config.vision.max_pos_embeddings:
        raise ValueError(f"images of {height}x{width} give a {grid[0]}x{grid[1]} token grid, more than the model's "
                         f"{config.vision.max_pos_embeddings}x{config.vision.max_pos_embeddings} position table: "
                         "the checkpoint's preprocessor_config.json does not fit its config.json")
    tokens = grid[0] * grid[1] + 1
    if tokens + 2 > config.text.max_position_embeddings:
        raise ValueError(f"images of {height}x{width} give {tokens} image tokens, which leave no room for a prompt in "
                         f"the encoder's {config.text.max_position_embeddings} positions: the checkpoint's "
                         "preprocessor_config.json (or its absence: 768x768) does not fit its config.json")


def _check_destination(out: Path, overwrite: bool, graph_files: list[str]) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder, or pass --overwrite to replace "
                              "the files the export writes (other files are left alone)")
    stale = sorted(p.name for p in (out / "onnx").glob("*.onnx") if p.name not in graph_files) if out.is_dir() else []
    if stale:
        raise FileExistsError(f"{out / 'onnx'} holds graphs this export would not replace ({', '.join(stale)}), which "
                              "would no longer match the new files; remove them first, or export into a new folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m florence2.export", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="hub id or checkpoint folder (Microsoft's or transformers' layout)")
    p.add_argument("out_dir", type=Path, help="output folder (new or empty)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="precision of the graphs (default fp32)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="also write *_quantized.onnx with int8 weights")
    p.add_argument("--adapter", default=None, help="a peft LoRA adapter folder to merge into MODEL first")
    p.add_argument("--revision", default=None, help="hub revision of MODEL")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR, replacing our files")
    args = p.parse_args(argv)
    try:
        require_export_extra()
        out = export(args.model, args.out_dir, dtype=args.dtype, quantize=args.quantize, adapter=args.adapter,
                     revision=args.revision, overwrite=args.overwrite)
    except cli.USER_ERRORS as e:
        return cli.report(p.prog, e)
    for path in sorted((out / "onnx").glob("*.onnx")):
        print(f"{path.relative_to(out)}  {path.stat().st_size / 2**20:.1f} MB")
    print(f"wrote {out}")
    return 0


__all__ = ["DTYPES", "GRAPHS", "VARIANTS", "export", "main"]

from .runtime import OnnxFlorence2  # noqa: E402  (it reads the names above)

__all__ += ["OnnxFlorence2"]
