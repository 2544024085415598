"""Evaluation: generate for every example of a split and score the answers with the task's metric.

    python -m training.evaluate --model microsoft/Florence-2-base-ft --task "<OD>" --dataset data/ --output-dir ev

The same function runs inside training (after each epoch) and here, so both report the same metrics and write the
same files to the output folder:

    metrics.json            (this command) the metrics, as training logs them: eval_loss, eval_map, ...
    predictions.jsonl       one line per example: its prompt, target, reference and parsed prediction
    ground_truth.coco.json  box and mask tasks: the references and predictions in COCO's formats, from which the
    predictions.coco.json   logged mAPs are computed (pycocotools' COCO(...) and loadRes(...) give the same numbers)

The command runs the vision tower as training does when the tower is frozen (each image's features on their own, so
that they do not depend on the batch), so a checkpoint's numbers are those its training logged. Under torchrun every
rank evaluates its share of the examples; the records are gathered and scored once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from florence2 import cli

from . import distributed
from .data import IGNORE_INDEX, TaskDataset, loader
from .feature_cache import frozen_features
from .formats import FORMATS, Columns, DataError, LazyCell


def loss_sum(model, batch, image_inputs: dict) -> torch.Tensor:
    """Summed cross-entropy of the batch's target tokens (padding, -100, left out; 0 where none is left). The
    logits are not asked for (the training kernels then compute the loss fused)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                 return_logits=False, loss_reduction="sum", **image_inputs).loss


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model, module, processor, dataset: TaskDataset, task, categories: dict[int, str], *, dist, device,
             bf16: bool, image_inputs, batch_size: int, num_workers: int, seed: int, num_beams: int,
             max_new_tokens: int, fail: bool, output_dir: Path | None) -> dict:
    """{"eval_loss", "eval_<metric>" for each of the task's metrics, "eval_examples"}; writes the predictions (and
    COCO files) to `output_dir` on the main rank. `model` is the module as wrapped for training (DDP, FSDP),
    `module` the model itself; `image_inputs(batch)` gives the image part of the model's inputs."""
    model.eval()
    # every rank runs the same number of batches (FSDP gathers weights collectively): the short ranks repeat their
    # first example, which is then left out of the loss and the records
    per_rank = -(-len(dataset) // dist.world_size)
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    indices += indices[:1] * (per_rank - len(indices))
    loss, tokens, records, seen, bad = 0.0, 0, [], set(), []
    for batch in loader(dataset, indices, batch_size, num_workers, seed, device.type == "cuda"):
        bad += batch.errors
        if not len(batch):
            continue
        repeated = [i in seen for i in batch.indices]
        seen.update(batch.indices)
        batch = batch.to(device)
        batch.labels[torch.tensor(repeated, device=device)] = IGNORE_INDEX
        inputs = image_inputs(batch)
        with autocast(device, bf16):
            loss += float(loss_sum(model, batch, inputs))
        with autocast(device, bf16), distributed.gathered(model):
            out = module.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, return_scores=task.scored,
                                  **inputs)
        tokens += int((batch.labels != IGNORE_INDEX).sum())
        sequences = out.sequences if task.scored else out
        for row, (index, decoded_size, again) in enumerate(zip(batch.indices, batch.image_sizes, repeated)):
            if not again:
                records.append(record(dataset, index, task.predict(
                    processor, sequences[row].cpu(), out.scores[row].cpu() if task.scored else None,
                    dataset.samples[dataset.examples[index].sample].size or decoded_size), decoded_size))
    totals = distributed.all_reduce_sum(torch.tensor([loss, float(tokens)], dtype=torch.float64, device=device), dist)
    records = sorted(distributed.gather_objects(records, dist), key=lambda r: r["index"])
    bad = distributed.gather_objects(bad, dist)
    if bad and fail:
        raise DataError(f"bad evaluation example ({bad[0]}); use --on-bad-example skip to skip such examples")
    number_queries(records, task)
    found, files = task.score(records, categories) if records else ({m: math.nan for m in task.metrics}, {})
    result = {"eval_loss": float(totals[0] / totals[1]) if totals[1] else math.nan,
              **{f"eval_{name}": value for name, value in found.items()}, "eval_examples": len(records)}
    if bad:
        result["eval_skipped_examples"] = len(bad)
    if dist.is_main and output_dir is not None and records:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        for name, content in files.items():
            (output_dir / name).write_text(json.dumps(content) + "\n")
    return result


def record(dataset: TaskDataset, index: int, prediction, decoded_size) -> dict:
    example = dataset.examples[index]
    sample = dataset.samples[example.sample]
    width, height = sample.size or decoded_size
    image = sample.image if not isinstance(sample.image, LazyCell) else f"{sample.where}"
    return {"index": index, "image_id": sample.image_id, "file_name": str(image), "width": width, "height": height,
            "prompt": example.prompt, "target": example.target, "reference": example.reference,
            "prediction": prediction}


def number_queries(records: list[dict], task) -> None:
    """Each record's id in the COCO files: the dataset's image id when every query is a different image of it
    (so the predictions also score against the dataset's own COCO file), else its position from 1."""
    ids = [r["image_id"] for r in records]
    keep = task.per_image and all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and len(
        set(ids)) == len(ids)
    for position, r in enumerate(records, start=1):
        r["query"] = r["image_id"] if keep else position


def shown(result: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                     if not isinstance(v, dict))


# ------------------------------------------------------------------------------------------------ the command
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local checkpoint folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--task", required=True, help="the task token: <OD>, <CAPTION>, ... or <DocVQA>, <VQA>, a prompt")
    p.add_argument("--dataset", required=True, help="a COCO, JSONL or YOLO folder, a hub id, a save_to_disk folder")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto")
    p.add_argument("--split", default="validation", help="also found as valid or val")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--image-size", type=cli.image_size, default=None, metavar="S|HxW",
                   help="evaluate at this size (default: the checkpoint's)")
    p.add_argument("--question-column", default="question")
    p.add_argument("--answers-column", default="answers")
    p.add_argument("--image-column", default="image")
    p.add_argument("--prompt-template", default=None, help="question answering: the prompt, with {question}")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (64 for questions, else "
                   "1024), at most the decoder's positions")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--on-bad-example", choices=["skip", "fail"], default="skip")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    for name in ("batch_size", "num_beams", "max_new_tokens", "max_prompt_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 0:
        p.error("--limit must be >= 0")
    return args


def run(args: argparse.Namespace) -> dict:
    from .setup import check_extras, fit_size, load_examples, load_model
    from .tasks import get_task

    task = get_task(args.task, args.prompt_template)
    check_extras(["datasets", "Levenshtein", *task.extras])
    dist = distributed.setup(args.device)
    try:
        log = print if dist.is_main else (lambda *a: None)
        # the data before the model, so that a mistake in it is found before a download
        columns = Columns(args.question_column, args.answers_column, args.image_column)
        split, examples = load_examples(task, args.dataset, args.split, training=False, fmt=args.format,
                                        fail=args.on_bad_example == "fail", config=args.dataset_config,
                                        columns=columns, limit=args.limit, log=log)
        model, processor = load_model(args.model, args.revision, args.attn_implementation)
        processor = fit_size(model, processor, args.image_size, [e.prompt for e in examples], args.max_prompt_tokens)
        positions = model.config.text.max_position_embeddings
        dataset = TaskDataset(split, examples, processor, args.max_prompt_tokens, min(task.max_target_tokens,
                                                                                      positions))
        model = model.to(dist.device).eval()
        result = evaluate(model, model, processor, dataset, task, split.categories, dist=dist, device=dist.device,
                          bf16=dist.device.type == "cuda" and args.precision in ("auto", "bf16"),
                          image_inputs=lambda batch: {"vision_features": frozen_features(model.vision_tower,
                                                                                         batch.pixel_values)},
                          batch_size=args.batch_size, num_workers=args.num_workers, seed=0,
                          num_beams=args.num_beams, max_new_tokens=min(args.max_new_tokens or task.max_new_tokens,
                                                                       positions),
                          fail=args.on_bad_example == "fail", output_dir=args.output_dir)
        if dist.is_main:
            (args.output_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            log(f"{task.token} on {split.description}: {shown(result)}")
        return result
    finally:
        distributed.teardown(dist)


def main(argv=None) -> dict:
    from .setup import USER_ERRORS

    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        sys.exit(f"python -m training.evaluate: error: {e}")


if __name__ == "__main__":
    main()
