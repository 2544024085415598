"""Training checkpoints that survive a kill at any moment.

A checkpoint is a folder `checkpoints/step-00000120/` holding what `Florence2.from_pretrained` loads (config.json,
model.safetensors, the processor files) plus `training_state.pt` (optimizer, scheduler, step, epoch, position in
the epoch, RNG states) and `trainer.json` (the arguments of the run). It is written in a temporary folder and
renamed into place, so every `step-*` folder is complete and the newest one is always loadable. `best/` holds the
checkpoint with the best validation score of the task's metric (hard links, so it costs no extra disk).

Only tensors and plain Python values are stored; training_state.pt is read with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "step-"


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the previous checkpoints are intact."""


class RunInUse(RuntimeError):
    """Another live run holds the output folder."""


@dataclass
class TrainingState:
    step: int  # optimizer steps done
    epoch: int
    position: int  # samples of this epoch already consumed (global, across ranks)
    best_score: float | None  # the best evaluation's value of the task's primary metric
    best_step: int | None
    skipped_examples: int
    optimizer: dict
    scheduler: dict
    rng: dict


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: Path, state: TrainingState, write_model, trainer_args: dict,
                    keep_last: int) -> Path:
    """Write a checkpoint atomically. `write_model(folder)` writes the weights and processor files.
    Keeps the newest `keep_last` checkpoints (and never touches best/)."""
    folder = checkpoint_dir(output_dir)
    final = folder / f"{PREFIX}{state.step:08d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_model(tmp)
        torch.save(vars(state), tmp / "training_state.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_args, indent=2, default=str) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. epoch end right after --save-every): replace it
            old = folder / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = {errno.ENOSPC: "disk full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}
        raise CheckpointSaveError(f"could not write checkpoint {final} ({reason.get(e.errno, e.strerror or e)}); "
                                  f"earlier checkpoints in {folder} are intact") from e
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Temporary folders of saves that were interrupted (a crash or kill -9 in the middle of a save). Call only
    while holding the run lock: then no save is in progress."""
    leftovers = [p for folder in (output_dir, checkpoint_dir(output_dir)) if folder.is_dir()
                 for p in folder.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def load_training_state(checkpoint: Path) -> TrainingState:
    path = checkpoint / "training_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no training_state.pt)")
    return TrainingState(**torch.load(path, map_location="cpu", weights_only=True))


def update_best(output_dir: Path, checkpoint: Path) -> Path:
    """Make output_dir/best a copy of `checkpoint` (hard links where the file system allows), atomically."""
    best = output_dir / "best"
    tmp = output_dir / f".tmp-best-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, copy_function=_link_or_copy)
    old = output_dir / f".old-best-{os.getpid()}"
    if best.exists():
        os.rename(best, old)
    os.rename(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class RunLock:
    """One run per output directory: a lock file holding the owner's pid. A lock whose process is gone is stale and
    is taken over (that is how a run resumes after a crash or a kill)."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / ".lock"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise RunInUse(f"{self.path.parent} is in use by another training run (pid {owner}); "
                                       "use another --output-dir, or wait for that run to stop and --resume it"
                                       ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return

    def release(self) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
