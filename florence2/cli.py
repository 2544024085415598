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
