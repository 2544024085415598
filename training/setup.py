"""What a run reads before it starts, for training and evaluation alike: the extras it needs, the model and its
processor at the asked image size, the task, and each split's examples."""

from __future__ import annotations

import importlib.util

from florence2 import Florence2, cli
from florence2.image_size import fit_image_size
from florence2.processor import Florence2Processor

from .checkpoint import CheckpointSaveError, RunInUse
from .formats import Columns, DataError, load_split
from .tasks import Task

# package -> the extra that installs it (the train extra holds every metric's library)
EXTRAS = {"datasets": "train", "Levenshtein": "train", "tqdm": "train", "matplotlib": "train", "yaml": "train",
          "pycocotools": "train", "jiwer": "train", "pycocoevalcap": "train", "peft": "lora"}


class MissingExtra(ImportError):
    """A package the run needs is not installed; the message says which extra installs it."""


# A user's mistake or the run's deliberate stop: the commands end these with one line and a non-zero exit. Those of
# every command of the package (bad values, missing files and checkpoints, missing extras: DataError, ConfigError
# and CheckpointError are ValueErrors), a checkpoint that cannot be saved, a run already using the folder, and
# --on-nan stop.
USER_ERRORS = (*cli.USER_ERRORS, CheckpointSaveError, RunInUse, FloatingPointError)


def check_extras(packages) -> None:
    """Say at once which optional packages are missing, before anything is loaded or trained."""
    missing = [p for p in dict.fromkeys(packages) if importlib.util.find_spec(p) is None]
    if missing:
        extras = sorted({EXTRAS.get(p, "train") for p in missing})
        raise MissingExtra(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                           + " and ".join(f'pip install -e ".[{extra}]"' for extra in extras))


def load_model(source: str, revision: str | None = None,
               attn_implementation: str = "sdpa") -> tuple[Florence2, Florence2Processor]:
    model = Florence2.from_pretrained(source, revision=revision, attn_implementation=attn_implementation)
    return model, Florence2Processor.from_pretrained(source, revision=revision)


def load_examples(task: Task, dataset: str, split: str, *, training: bool, fmt: str = "auto", fail: bool = False,
                  config: str | None = None, columns: Columns | None = None, limit: int | None = None, log=print):
    """The split and its examples for `task`; what was skipped is reported through `log` (all of it in the log,
    the first 20 on screen)."""
    data = load_split(dataset, split, fmt, fail=fail, config=config, columns=columns)
    examples = [e for i, sample in enumerate(data.samples) for e in task.examples(sample, i, training)]
    if limit is not None:
        examples = examples[:limit]
    for problem in data.problems[:20]:
        log(f"skipped {problem}")
    if len(data.problems) > 20:
        log(f"... and {len(data.problems) - 20} more")
    if task.needs_regions and not any(s.regions or s.prefix is not None for s in data.samples):
        examples = []  # a detection task on data without a single box (a QA dataset, say)
    if not examples and limit != 0:
        raise DataError(f"{data.description}: no {task.token} examples: the task needs {task.requires}, and none "
                        f"of the split's {len(data.samples)} images has them")
    return data, examples


def fit_size(model: Florence2, processor: Florence2Processor, size: tuple[int, int] | None, prompts,
             max_prompt_tokens: int | None) -> Florence2Processor:
    """The processor at `size` (None: the checkpoint's), the model's position table grown if the image tokens and
    the longest prompt (or max_prompt_tokens) need it."""
    if size is None:
        return processor
    longest = max_prompt_tokens or max((len(processor.prompt_ids(p)) for p in prompts), default=2)
    try:
        return fit_image_size(model, processor, size, longest)
    except ValueError as e:
        raise DataError(str(e)) from None

