"""python -m florence2 IMAGE --task "<OD>" [--text ...] [--model PATH_OR_ID] [--json] [--draw out.png]
                          [--slice 768 [--slice-overlap 0.2] [--slice-only]]

python -m florence2 predict INPUT... --task TASK --output OUT ...: batch prediction (florence2/batch.py).

A mistake (no such image, a checkpoint that cannot be found, a bad flag, dtype or device) ends in one line on
stderr and a non-zero exit status (florence2.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import cli, slicing


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        from .batch import main as batch_main

        return batch_main(argv[1:])
    from .postprocess import TASKS

    p = cli.ArgumentParser(prog="python -m florence2", description="Run a Florence-2 task on an image.")
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}; or <DocVQA>, <VQA>, free text")
    p.add_argument("--text", default=None, help="the task's input: a phrase, a question, or region loc tokens")
    p.add_argument("--model", default="microsoft/Florence-2-base-ft", help="hub id or local checkpoint folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16")
    p.add_argument("--num-beams", type=int, default=None, help="default: the checkpoint's (3)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--image-size", type=cli.image_size, default=None, metavar="S|HxW",
                   help="read the image at this size (multiples of 32; default: the checkpoint's)")
    p.add_argument("--compile", action="store_true",
                   help="run the decoder step through torch.compile (docs/compiled-decoding.md)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--draw", type=Path, default=None, help="write the image with the result drawn on it")
    slicing.add_arguments(p)
    args = p.parse_args(argv)
    slicing.check_arguments(p, args)
    try:
        return run(args)
    except cli.USER_ERRORS as e:
        return cli.report(p.prog, e)


def run(args) -> int:
    import torch
    from PIL import Image

    from .draw import draw_result
    from .image_size import processor_at
    from .model import Florence2
    from .predict import default_processor

    if args.slice is not None:
        from . import sahi  # noqa: F401  (sahi missing: said before anything loads)
    if not args.image.is_file():
        raise FileNotFoundError(f"no image file at {args.image}")
    try:
        with Image.open(args.image) as opened:
            image = opened.copy()
    except OSError as e:
        raise ValueError(f"cannot read {args.image} as an image: {e}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Florence2.from_pretrained(args.model, revision=args.revision, dtype=args.dtype, device=device)
    options = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
               if v is not None}
    processor = None if args.image_size is None else processor_at(model, default_processor(model), args.image_size)
    if args.compile:
        options["compile"] = True
    if args.slice is None:
        result = model.predict(image, args.task, text=args.text, processor=processor, **options)
    else:
        from .sahi import sliced_answer

        result = sliced_answer(model, image, args.task, args.text, args.slice, args.slice_overlap,
                               whole_page=not args.slice_only, processor=processor, **options)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        answer = result[args.task]
        print(answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False, indent=1))
    if args.draw is not None:
        draw_result(image, result, args.task).save(args.draw)
        print(f"drawn: {args.draw}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
