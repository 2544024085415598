"""Fault injection: kill -9 at any moment, broken examples, non-finite losses."""

import io
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from florence2 import Florence2
from training import trainer
from training.docvqa import main
from training.synthetic import build_dataset

from .conftest import last_checkpoint, metrics, train_args, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model's ops are too small to share out

ROOT = Path(__file__).resolve().parents[1]

# Runs the trainer with one function patched to announce itself (a marker file) and then hang, so that the test
# can kill the process at exactly that point.
HANG = """
import sys, time, pathlib
import training.checkpoint as checkpoint, training.docvqa as docvqa, training.trainer as trainer
marker, where, after = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
calls = {"n": 0}
def hang_after(original):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            marker.write_text("here")
            time.sleep(600)
        return original(*args, **kwargs)
    return wrapper
if where == "save":  # inside a checkpoint save, after the weights were written to the temporary folder
    checkpoint._fsync_tree = hang_after(checkpoint._fsync_tree)
else:  # in the middle of a training step
    trainer.train_step = hang_after(trainer.train_step)
docvqa.main(sys.argv[4:])
"""


def kill_at(where, after, argv, tmp_path):
    marker = tmp_path / f"marker-{where}-{after}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread, as the runs in this process
    process = subprocess.Popen([sys.executable, "-c", HANG, str(marker), where, str(after), *argv], env=env,
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited before the kill point: {process.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "the kill point was never reached"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_auto_finishes_like_an_uninterrupted_run(no_dropout_model_dir, small_dataset_dir,
                                                                             tmp_path):
    main(train_args(no_dropout_model_dir, small_dataset_dir, tmp_path / "straight", "--save-every", "3"))
    expected = dict(train_losses(tmp_path / "straight"))
    assert len(expected) == 8  # two epochs of four steps, checkpoints at 3 and 6 (and each epoch's end)
    out = tmp_path / "killed"
    argv = train_args(no_dropout_model_dir, small_dataset_dir, out, "--save-every", "3", "--resume", "auto")
    kill_at("step", 1, argv, tmp_path)  # before the first checkpoint
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step-*"))
    kill_at("save", 0, argv, tmp_path)  # during the first save: only a temporary folder exists
    assert not any((out / "checkpoints").glob("step-*"))
    kill_at("step", 3, argv, tmp_path)  # mid-epoch, in step 4, after the first checkpoint (step 3)
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000003"]
    main(argv)  # --resume auto: continues from step 3, the lock of the killed run is stale
    got = {}
    for step, loss in train_losses(out):
        got[step] = loss  # later lines (the resumed run) override the killed runs' lines
    assert got == expected
    final = last_checkpoint(tmp_path / "straight").name
    a = Florence2.from_pretrained(tmp_path / "straight" / "checkpoints" / final).state_dict()
    b = Florence2.from_pretrained(out / "checkpoints" / final).state_dict()
    for (name, x), y in zip(a.items(), b.values()):
        assert torch.equal(x, y), name
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # temporaries cleaned up


def test_a_second_run_on_the_same_output_dir_is_refused(no_dropout_model_dir, dataset_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(SystemExit) as stopped:
            main(train_args(no_dropout_model_dir, dataset_dir, out))
        assert "in use by another training run" in str(stopped.value)
    finally:
        sleeper.kill()
        sleeper.wait()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory):
    """Good documents mixed with every kind of bad example."""
    good = build_dataset(train_documents=2, validation_documents=1, seed=0)
    rows = {"question": [], "answers": [], "image": []}
    truncated = _png(Image.new("RGB", (200, 200), "red"))[:300]
    bomb = Image.new("1", (12000, 12000))  # 144M pixels, over Pillow's decompression-bomb limit, tiny as a PNG
    bad = [
        ("What is this?", ["x"], {"bytes": b"not an image at all", "path": None}),
        ("What is this?", ["x"], {"bytes": truncated, "path": None}),
        ("", ["x"], {"bytes": _png(Image.new("RGB", (50, 50))), "path": None}),
        ("What is this?", [], {"bytes": _png(Image.new("RGB", (50, 50))), "path": None}),
        ("What is this?", ["x"], {"bytes": _png(bomb), "path": None}),
    ]
    odd = [  # odd but valid: these must train, not be skipped
        ("Tiny?", ["yes"], {"bytes": _png(Image.new("RGB", (1, 1), "white")), "path": None}),
        ("Deep?", ["yes"], {"bytes": _png(Image.new("I;16", (40, 30), 4000)), "path": None}),
        ("Print?", ["yes"], {"bytes": _tiff_cmyk(), "path": None}),
        ("Palette?", ["yes"], {"bytes": _png_palette_with_transparency(), "path": None}),
    ]
    for question, answers, image in bad + odd:
        rows["question"].append(question)
        rows["answers"].append(answers)
        rows["image"].append(image)
    features = datasets.Features({"question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")),
                                  "image": datasets.Image(decode=False)})
    extra = datasets.Dataset.from_dict(rows, features=features)
    train = good["train"].select_columns(["question", "answers", "image"]).cast(features)
    merged = datasets.DatasetDict({"train": datasets.concatenate_datasets([train, extra]),
                                   "validation": good["validation"]})
    folder = tmp_path_factory.mktemp("broken") / "data"
    merged.save_to_disk(str(folder))
    return folder, len(bad)


def _tiff_cmyk() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(buffer, format="TIFF")
    return buffer.getvalue()


def _png_palette_with_transparency() -> bytes:
    image = Image.new("P", (30, 20))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    return _png(image)


def test_bad_examples_are_skipped_counted_and_reported(no_dropout_model_dir, broken_dataset, tmp_path, capsys):
    folder, bad = broken_dataset
    # batch 1: no example falls into a dropped incomplete batch, so every bad one is met exactly once
    argv = train_args(no_dropout_model_dir, folder, tmp_path / "run", "--batch-size", "1", "--epochs", "1")
    summary = main(argv)
    assert summary["skipped_examples"] == bad
    printed = capsys.readouterr().out
    assert f"{bad} bad examples were skipped" in printed
    for reason in ("cannot identify image file", "truncated", "empty question", "no non-empty answer",
                   "decompression bomb"):
        assert reason.lower() in printed.lower(), reason


def test_bad_example_fail_mode_stops_with_the_reason(no_dropout_model_dir, broken_dataset, tmp_path):
    folder, _ = broken_dataset
    argv = train_args(no_dropout_model_dir, folder, tmp_path / "run", "--on-bad-example", "fail")
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert re.search(r"error: bad example \(.*, row \d+: empty question\); use --on-bad-example skip",
                     str(stopped.value))


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_non_finite_loss_never_updates_the_weights(no_dropout_model_dir, dataset_dir, tmp_path, monkeypatch, mode):
    original = trainer.loss_sum
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = original(*args)
        return loss * float("nan") if calls["n"] == 2 else loss  # the second training step goes NaN

    monkeypatch.setattr(trainer, "loss_sum", poisoned)
    out = tmp_path / mode
    argv = train_args(no_dropout_model_dir, dataset_dir, out, "--on-nan", mode, "--eval-limit", "0",
                      "--max-steps", "3")
    if mode == "stop":
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert re.search(r"step 2: non-finite loss.*stopped after saving a checkpoint", str(stopped.value))
        saved = Florence2.from_pretrained(out / "checkpoints" / "step-00000002")
        assert all(torch.isfinite(p).all() for p in saved.parameters())
        return
    main(argv)
    losses = dict(train_losses(out))
    assert [math.isnan(losses[step]) for step in (1, 2, 3)] == [False, True, False]  # NaN only at step 2
    final = Florence2.from_pretrained(out / "checkpoints" / "step-00000003")
    assert all(torch.isfinite(p).all() for p in final.parameters())
    assert [r["step"] for r in metrics(out) if r.get("skipped_step")] == [2]
