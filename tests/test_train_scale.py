"""Training at scale: two processes against one, FSDP, the frozen-encoder feature cache, LoRA."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from florence2 import Florence2
from training.data import EpochSampler
from training.docvqa import parse_args
from training.lora import DEFAULT_TARGETS, add_lora, load_adapter, merged_state_dict
from training.trainer import fit

from .conftest import TRAIN_IMAGE_SIZE as IMAGE_SIZE
from .conftest import detection_args, last_checkpoint, metrics, prepared, train_args, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model's ops are too small to share out

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc, argv, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "training.docvqa", *argv]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def final_weights(out):
    return Florence2.from_pretrained(last_checkpoint(out)).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "switches"), [
    ("ddp", []),
    # FSDP shards a trained tower block by block (a frozen one stays whole: the detection test below has it)
    ("fsdp", ["--train-vision"]),
    # the detection demo's: a trained tower below a frozen text encoder (its layers sharded, nothing to reduce)
    ("fsdp", ["--train-vision", "--no-train-text-encoder"]),
], ids=["ddp", "fsdp", "fsdp-frozen-text-encoder"])
def test_two_processes_equal_one_with_the_same_global_batch(no_dropout_model_dir, small_dataset_dir, tmp_path,
                                                          strategy, switches):
    one = torchrun(1, train_args(no_dropout_model_dir, small_dataset_dir, tmp_path / "one", *switches),
                   tmp_path / "one")
    two = torchrun(2, train_args(no_dropout_model_dir, small_dataset_dir, tmp_path / "two", "--batch-size", "2",
                                 "--strategy", strategy, *switches), tmp_path / "two")
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two]
    for (_, a), (_, b) in zip(losses_one, losses_two):
        assert a == pytest.approx(b, abs=1e-5)
    for (name, a), b in zip(final_weights(one).items(), final_weights(two).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    evals_one = [r["eval_examples"] for r in metrics(one) if "eval_anls" in r]
    assert evals_one == [r["eval_examples"] for r in metrics(two) if "eval_anls" in r] == [4, 4]


@pytest.mark.slow
def test_resume_on_a_different_number_of_ranks(no_dropout_model_dir, small_dataset_dir, tmp_path):
    straight = torchrun(1, train_args(no_dropout_model_dir, small_dataset_dir, tmp_path / "a"), tmp_path / "a")
    two_ranks = torchrun(2, train_args(no_dropout_model_dir, small_dataset_dir, tmp_path / "b", "--batch-size", "2",
                                       "--save-every", "2", "--keep-last", "0"), tmp_path / "b")
    # continue the two-rank run from its step-2 checkpoint on one rank (same global batch of 4)
    resumed = tmp_path / "c"
    shutil.copytree(two_ranks / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    torchrun(1, train_args(no_dropout_model_dir, small_dataset_dir, resumed, "--resume", "auto"), resumed)
    expected = [x for x in train_losses(straight) if x[0] > 2]
    assert [s for s, _ in train_losses(resumed)] == [s for s, _ in expected]
    assert [loss for _, loss in train_losses(resumed)] == pytest.approx([loss for _, loss in expected], abs=1e-5)
    for (name, a), b in zip(final_weights(straight).items(), final_weights(resumed).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_feature_cache_skips_the_tower_after_the_first_epoch(no_dropout_model_dir, dataset_dir, tmp_path):
    runs = {}
    for cache in ("none", "memory", "disk"):
        out = tmp_path / cache
        fit(parse_args(train_args(no_dropout_model_dir, dataset_dir, out, "--feature-cache", cache)))
        runs[cache] = out
    plain = train_losses(runs["none"])
    for cache in ("memory", "disk"):
        out = runs[cache]
        assert train_losses(out) == plain  # the same features, bit for bit: identical losses
        per_epoch = [r["vision_tower_images"] for r in metrics(out) if "vision_tower_images" in r]
        assert per_epoch[0] > 0 and per_epoch[1:] == [0] * (len(per_epoch) - 1)


def test_lora_trains_saves_merged_weights_and_matches_the_adapter_model(no_dropout_model_dir, dataset_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    argv = train_args(no_dropout_model_dir, dataset_dir, out, "--lora", "--lora-rank", "4", "--lr", "1e-2")
    trainable = [n for n, p in prepared(parse_args(argv)).module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    fit(parse_args(argv))
    final = last_checkpoint(out)
    merged = Florence2.from_pretrained(final).eval()
    adapter_model = Florence2.from_pretrained(no_dropout_model_dir)  # the base plus the saved adapters
    add_lora(adapter_model, 4, 8.0, 0.05, DEFAULT_TARGETS, include_vision=False)
    load_adapter(adapter_model, final)
    adapter_model.eval()
    px = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    ids = torch.tensor([[0, 100, 200, 2], [0, 300, 400, 2]])
    labels = torch.tensor([[0, 500, 2], [0, 600, 2]])
    with torch.no_grad():
        a = adapter_model(pixel_values=px, input_ids=ids, labels=labels).logits
        b = merged(pixel_values=px, input_ids=ids, labels=labels).logits
    base = Florence2.from_pretrained(no_dropout_model_dir).eval()
    with torch.no_grad():
        c = base(pixel_values=px, input_ids=ids, labels=labels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapters did learn something


def test_merged_state_dict_folds_the_adapters_in():
    pytest.importorskip("peft")
    model = Florence2.from_config("tiny", seed=0).eval()
    add_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=("q_proj", "fc1"), include_vision=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = Florence2.from_config("tiny").eval()
    merged.load_state_dict(merged_state_dict(model.state_dict(), scale=2.0))
    px, ids, dec = torch.randn(1, 3, 64, 64), torch.tensor([[0, 7, 2]]), torch.tensor([[2, 0, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=px, input_ids=ids, decoder_input_ids=dec).logits,
                                   merged(pixel_values=px, input_ids=ids, decoder_input_ids=dec).logits,
                                   rtol=0, atol=1e-5)


def test_group_by_length_batches_examples_of_similar_token_counts(no_dropout_model_dir, dataset_dir, tmp_path):
    run = prepared(parse_args(train_args(no_dropout_model_dir, dataset_dir, tmp_path / "grouped",
                                         "--group-by-length", "--batch-size", "2")))
    tokens = [len(run.processor.prompt_ids(e.prompt)) + len(run.processor.text_ids(e.target))
              for e in run.train_set.examples]
    assert run.lengths == tokens and len(set(tokens)) > 2

    def spread(lengths):  # the padding a batch of the first epoch needs, summed over the batches
        order = list(EpochSampler(len(tokens), 2, seed=0, lengths=lengths))
        return sum(max(tokens[i] for i in order[b:b + 2]) - min(tokens[i] for i in order[b:b + 2])
                   for b in range(0, len(order), 2))

    assert spread(run.lengths) < spread(None) / 2
    out = tmp_path / "run"
    fit(parse_args(train_args(no_dropout_model_dir, dataset_dir, out, "--group-by-length", "--max-steps", "2")))
    assert [s for s, _ in train_losses(out)] == [1, 2]


# Runs training.finetune under torchrun with DDP's gradient reduction counted: each bucket's all-reduce is recorded
# as happening during a micro-step that should skip it (before the last of the step) or one that should not.
COUNTING = """
import contextlib, json, os, sys
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from training import distributed, finetune
calls, state = {"during_skipped_micro_steps": 0, "during_last_micro_steps": 0}, {"skip": False}
original_no_sync, original_wrap = distributed.no_sync, distributed.wrap

@contextlib.contextmanager
def recording_no_sync(model, skip):
    state["skip"] = skip
    with original_no_sync(model, skip):
        yield

def counting_wrap(model, strategy, d):
    wrapped = original_wrap(model, strategy, d)
    def hook(process_group, bucket):
        calls["during_skipped_micro_steps" if state["skip"] else "during_last_micro_steps"] += 1
        return allreduce_hook(process_group, bucket)
    if strategy == "ddp":
        wrapped.register_comm_hook(None, hook)
    return wrapped

distributed.no_sync, distributed.wrap = recording_no_sync, counting_wrap
finetune.main(sys.argv[2:])
with open(f"{sys.argv[1]}-{os.environ['RANK']}.json", "w") as f:
    json.dump(calls, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_detection_with_grad_accum_two_processes_equal_one_and_skip_the_early_all_reduces(
        no_dropout_model_dir, detection_exports, tmp_path, strategy):
    coco, one, two = detection_exports["coco"], tmp_path / "one", tmp_path / "two"
    # the same global batch of 4: 2 examples x 2 micro-steps on one process, 1 x 2 on each of two
    fit(parse_args(detection_args(no_dropout_model_dir, coco, one, "--grad-accum", "2", "--epochs", "2")))
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path / "calls"), *detection_args(no_dropout_model_dir, coco, two, "--grad-accum", "2",
                                                        "--epochs", "2", "--batch-size", "1", "--strategy", strategy)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] == [1, 2]
    for (_, a), (_, b) in zip(losses_one, losses_two):
        assert a == pytest.approx(b, abs=1e-5)
    for (name, a), b in zip(final_weights(one).items(), final_weights(two).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    for rank in (0, 1) if strategy == "ddp" else ():  # DDP reduced gradients on the last micro-step of a step only
        calls = json.loads((tmp_path / f"calls-{rank}.json").read_text())
        assert calls["during_skipped_micro_steps"] == 0 and calls["during_last_micro_steps"] > 0, calls
