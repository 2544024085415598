"""The command line: python -m florence2.serve."""

import argparse
import io
import signal
import sys
import threading

import torch
from PIL import Image

from .. import cli
from ..batch import quiet_hub
from .app import create_app
from .server import Limits, Server


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m florence2.serve", description=sys.modules[__package__].__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local checkpoint folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per generate call")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others")
    defaults = Limits()
    p.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20)
    p.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    p.add_argument("--max-num-beams", type=int, default=defaults.max_num_beams)
    p.add_argument("--compile", action="store_true",
                   help="run the decoder step through torch.compile (docs/compiled-decoding.md)")
    args = p.parse_args(argv)
    if args.max_batch_size < 1 or args.max_wait_ms < 0:
        p.error("--max-batch-size must be at least 1 and --max-wait-ms at least 0")
    if args.max_body_mb <= 0 or args.max_image_pixels < 1 or args.max_num_beams < 1:
        p.error("--max-body-mb, --max-image-pixels and --max-num-beams must be positive")
    if not 0 <= args.port <= 65535:  # uvicorn's bind would raise OverflowError, a traceback
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (for the form uploads)
        import uvicorn
    except ImportError as e:
        return cli.report("python -m florence2.serve", ImportError(f"it needs {e.name}: pip install -e \".[serve]\""))
    from ..model import Florence2
    from ..predict import default_processor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # a checkpoint that cannot be found offline, a bad dtype or device: one line, not a traceback
        with quiet_hub():  # (and not the hub's retries, a line each)
            model = Florence2.from_pretrained(args.model, revision=args.revision, dtype=args.dtype, device=device)
    except cli.USER_ERRORS as e:
        return cli.report("python -m florence2.serve", e)
    limits = Limits(int(args.max_body_mb * 2**20), args.max_image_pixels, args.max_num_beams)
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # PIL's own guard refuses twice as many before decoding
    server = Server(model, default_processor(model), max_batch_size=args.max_batch_size,
                    max_wait_ms=args.max_wait_ms, limits=limits, compile=args.compile)
    warm_up(server)
    http = uvicorn.Server(uvicorn.Config(create_app(server), host=args.host, port=args.port))

    def answer_http() -> None:
        try:
            http.run()  # (in a thread, uvicorn leaves the signals to us)
        finally:
            server.batcher.stop()

    def shut_down(signum, frame) -> None:  # as uvicorn does: finish what is asked, then stop; twice: at once
        http.force_exit = http.should_exit
        http.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, shut_down)
    thread = threading.Thread(target=answer_http, name="http")
    thread.start()
    server.batcher.serve()  # the model in the main thread (see Batcher)
    thread.join()
    return 0 if http.started else 1  # not started: uvicorn said why (the port is taken, ...)


def warm_up(server: Server) -> None:
    """One short generation before the first request: kernels chosen, lazy imports done."""
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(blank, format="PNG")
    options = server.check_options({"max_new_tokens": 2}, from_form=False)
    server.run([server.prepare(blank.getvalue(), "<CAPTION>", "<CAPTION>", options, server.batch_key(options))])
    print(f"florence2.serve: {server.health()['model']} ready", file=sys.stderr, flush=True)
