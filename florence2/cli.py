"""What the package's command lines share: a user's mistake ends in one line on stderr and a non-zero exit status,
never a traceback. A bad flag exits with 2 (argparse's status), any other mistake with 1."""

from __future__ import annotations

import argparse
import sys

from .image_size import parse_image_size

# The errors a command reports as the user's: bad values and inputs (ValueError, with CheckpointError and
# ConfigError), files and checkpoints that are missing or unreadable (OSError), a missing optional extra
# (ImportError, whose message says which pip install fixes it). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def image_size(text: str) -> tuple[int, int]:
    """The type of --image-size flags: "768" or "HxW", multiples of 32 (florence2.image_size)."""
    try:
        return parse_image_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def report(prog: str, error: BaseException) -> int:
    """Print `error` as the one line of a failed command; the exit status to return."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def add_slice_arguments(p: argparse.ArgumentParser) -> None:
    """--slice and --slice-overlap: read large pages in overlapping slices (florence2.sahi)."""
    from .slicing import parse_slice

    def slice_size(text: str) -> tuple[int, int]:
        try:
            return parse_slice(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--slice", type=slice_size, default=None, metavar="S|HxW",
                   help="read the image in slices of this size in pixels, merged back (needs sahi)")
    p.add_argument("--slice-overlap", type=float, default=None, metavar="R",
                   help="share of a slice its neighbours also cover, in [0, 1) (default 0.2)")
    p.add_argument("--slice-only", action="store_true",
                   help="merge the slices' boxes only, without those of the whole page read once more (SAHI's "
                        "no_standard_prediction)")


def check_slice_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of the slice flags: an overlap outside [0, 1), --slice-overlap or --slice-only without --slice,
    a task slicing cannot serve; the default overlap filled in."""
    from .slicing import DEFAULT_OVERLAP, check_overlap, slice_refusal

    if args.slice is None:
        if args.slice_overlap is not None or args.slice_only:
            p.error(f"{'--slice-overlap' if args.slice_overlap is not None else '--slice-only'} needs --slice")
        return
    try:
        args.slice_overlap = check_overlap(DEFAULT_OVERLAP if args.slice_overlap is None else args.slice_overlap)
    except ValueError as e:
        p.error(str(e))
    refusal = slice_refusal(args.task)
    if refusal is not None:
        p.error(refusal)
