"""Pieces of the trainer that need no model: the epoch sampler, checkpoint files, the run lock, the feature cache."""

import os
import subprocess
import sys

import pytest
import torch

from training import checkpoint as ckpt
from training.data import Collator, EpochSampler
from training.feature_cache import FeatureCache


def _state(step):
    return ckpt.TrainingState(step=step, epoch=0, position=step * 4, best_score=None, best_step=None,
                              skipped_examples=0, optimizer={"state": {}, "param_groups": []}, scheduler={},
                              rng=ckpt.rng_state())


# ---------------------------------------------------------------------------------------------------- sampler
def test_sampler_same_global_batches_for_any_number_of_ranks():
    one = list(EpochSampler(50, batch_size=8, seed=1, epoch=2))
    two = [list(EpochSampler(50, batch_size=4, seed=1, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == 48  # 6 global batches of 8, the incomplete last one dropped
    for b in range(6):
        assert one[8 * b: 8 * b + 8] == two[0][4 * b: 4 * b + 4] + two[1][4 * b: 4 * b + 4]


def test_sampler_epochs_and_start():
    a = list(EpochSampler(40, batch_size=4, seed=0, epoch=0))
    b = list(EpochSampler(40, batch_size=4, seed=0, epoch=1))
    assert sorted(a) == sorted(b) == list(range(40)) and a != b
    resumed = EpochSampler(40, batch_size=4, seed=0, epoch=0, start=12)
    assert list(resumed) == a[12:] and len(resumed) == 28


def test_sampler_group_by_length():
    lengths = [i % 7 for i in range(64)]
    grouped = list(EpochSampler(64, batch_size=4, seed=0, lengths=lengths))
    assert sorted(grouped) == list(range(64))
    spread = [max(lengths[i] for i in grouped[s:s + 4]) - min(lengths[i] for i in grouped[s:s + 4])
              for s in range(0, 64, 4)]
    plain = list(EpochSampler(64, batch_size=4, seed=0))
    plain_spread = [max(lengths[i] for i in plain[s:s + 4]) - min(lengths[i] for i in plain[s:s + 4])
                    for s in range(0, 64, 4)]
    assert sum(spread) < sum(plain_spread) / 2


def test_collator_pads_and_drops_bad_examples():
    good = {"index": 0, "pixel_values": torch.zeros(3, 4, 4), "prompt_ids": [0, 5, 2], "target_ids": [0, 9, 9, 2],
            "image_key": "k", "image_size": (4, 4)}
    short = {**good, "index": 1, "prompt_ids": [0, 2], "target_ids": [0, 2]}
    batch = Collator(pad_token_id=1)([good, {"error": "example 7: broken", "index": 7}, short])
    assert batch.indices == [0, 1] and batch.errors == ["example 7: broken"]
    assert batch.input_ids.tolist() == [[0, 5, 2], [0, 2, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[0, 9, 9, 2], [0, 2, -100, -100]]


# ------------------------------------------------------------------------------------------------ checkpoints
def _write(folder):
    (folder / "model.safetensors").write_bytes(b"weights")


def test_checkpoints_are_complete_and_rotated(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, _state(step), _write, {"global_batch": 4}, keep_last=2)
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-00000020", "step-00000030"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000030"
    state = ckpt.load_training_state(found[-1])
    assert state.step == 30 and state.position == 120
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(10), _write, {}, keep_last=2)

    def disk_full(folder):
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointSaveError, match=r"step-00000020 \(disk full\).*intact"):
        ckpt.save_checkpoint(tmp_path, _state(20), disk_full, {}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000010"]
    assert ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path)).step == 10
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_permission_denied_names_the_path(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(10), _write, {}, keep_last=2)

    def no_permission(folder):
        raise PermissionError(13, "Permission denied", str(folder / "model.safetensors"))

    with pytest.raises(ckpt.CheckpointSaveError, match=r"checkpoints/step-00000020 \(permission denied\)"):
        ckpt.save_checkpoint(tmp_path, _state(20), no_permission, {}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000010"]


def test_best_is_a_loadable_copy(tmp_path):
    first = ckpt.save_checkpoint(tmp_path, _state(10), _write, {}, keep_last=1)
    best = ckpt.update_best(tmp_path, first)
    ckpt.save_checkpoint(tmp_path, _state(20), _write, {}, keep_last=1)
    assert not first.exists()  # rotated away, but best/ keeps its files
    assert (best / "model.safetensors").read_bytes() == b"weights"
    assert ckpt.load_training_state(best).step == 10


def test_training_state_refuses_code(tmp_path):
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    torch.save({"step": 1, "payload": os.system}, folder / "training_state.pt")
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported global"):
        ckpt.load_training_state(folder)


def test_lock_refuses_a_second_live_run_and_takes_over_a_dead_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(ckpt.RunInUse, match=f"in use by another training run \\(pid {sleeper.pid}\\)"):
            ckpt.RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with ckpt.RunLock(tmp_path):  # its owner is gone: the lock is stale and taken over
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


# ---------------------------------------------------------------------------------------------- feature cache
class CountingTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.scale = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, pixels):
        self.calls += pixels.shape[0]
        return pixels.permute(0, 2, 3, 1) * self.scale


@pytest.mark.parametrize("on_disk", [False, True])
def test_feature_cache_computes_each_image_once(tmp_path, on_disk):
    cache = FeatureCache(tmp_path / "cache" if on_disk else None)
    tower = CountingTower()
    pixels = torch.randn(3, 3, 2, 2)
    first = cache.features(tower, ["a", "b", "a"], pixels)
    assert tower.calls == 2  # "a" twice in the batch: computed once
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(first[1], pixels[1].permute(1, 2, 0) * 2)
    again = cache.features(tower, ["b", "a"], torch.zeros(2, 3, 2, 2))  # pixels unused: served from the cache
    assert tower.calls == 2 and torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    assert len(cache) == 2 and cache.hits == 3 and cache.misses == 2
