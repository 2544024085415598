"""The training loop: `fit(config)` fine-tunes a Florence-2 checkpoint on one task and evaluates it as it goes.

    one process, DDP or FSDP2 (torchrun), bf16 autocast on CUDA, gradient accumulation, the frozen vision tower's
    features computed once (--feature-cache), LoRA, exact resume and kill -9 at any moment (checkpoint.py)

It reads top to bottom: set up (model, data, optimizer, schedule, the state to resume), then for each epoch the
optimizer steps (`train_step`), logging, evaluations and checkpoints. What is specific to a task (its examples and
metric) lives in tasks.py, what is specific to a data format in formats/, the evaluation in evaluate.py.

The loss is the sum of token losses over all micro-batches and ranks divided by their number of target tokens, so
every target token weighs the same whatever the padding and the split of a global batch across ranks; the data
order is a function of (seed, epoch, position), the same for any number of ranks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from florence2 import kernels

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig
from .data import IGNORE_INDEX, EpochSampler, TaskDataset, loader
from .evaluate import autocast, evaluate, loss_sum, shown
from .feature_cache import FeatureCache, frozen_features
from .formats import Columns, DataError
from .setup import fit_size, load_examples, load_model
from .tasks import get_task


@dataclass
class Run:
    """Everything the loop's helpers share."""

    cfg: TrainConfig
    dist: distributed.Dist
    task: object = None
    model: torch.nn.Module = None  # as wrapped for training (DDP, FSDP), what steps call
    module: torch.nn.Module = None  # the Florence2 itself
    processor: object = None
    train_set: TaskDataset = None
    eval_set: TaskDataset = None
    categories: dict = field(default_factory=dict)
    cache: FeatureCache | None = None
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    state: ckpt.TrainingState = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    global_batch: int = 0
    lengths: list[int] | None = None
    max_new_tokens: int = 0
    log_lines: list[dict] = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    pending_losses: list[float] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def bf16(self) -> bool:
        """bf16 autocast: with --precision bf16 on any device; by default (auto) on a CUDA GPU that computes in bf16
        (Ampere and later: older ones, a T4 or a V100, would emulate it, slower than float32, which they get)."""
        if self.cfg.precision != "auto":
            return self.cfg.precision == "bf16"
        return self.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def fit(cfg: TrainConfig) -> dict:
    """Train as `cfg` says. Returns the summary: steps, skipped examples, best score and step, first and last
    evaluation."""
    run = Run(cfg, distributed.setup(cfg.device))
    lock = ckpt.RunLock(cfg.output_dir) if run.dist.is_main else None
    if lock:
        lock.acquire()
        for leftover in ckpt.remove_leftovers(cfg.output_dir):
            say(run, f"removed {leftover}, left by an interrupted save")
    try:
        prepare(run)
        if cfg.eval_before_training and run.state.step == 0:
            evaluate_now(run)
        while run.state.step < run.total_steps and run.state.epoch < cfg.epochs:
            started = (time.perf_counter(), run.state.position, run.cache.misses if run.cache else 0)
            sampler = EpochSampler(len(run.train_set), cfg.batch_size, cfg.seed, run.state.epoch,
                                   run.state.position, run.dist.rank, run.dist.world_size, lengths=run.lengths)
            batches = iter(loader(run.train_set, sampler, cfg.batch_size, cfg.num_workers, cfg.seed,
                                  run.device.type == "cuda"))
            progress = progress_bar(run)
            while run.state.step < run.total_steps:
                micro = [b for b in (next(batches, None) for _ in range(cfg.grad_accum)) if b is not None]
                if len(micro) < cfg.grad_accum:
                    break  # end of epoch
                step_started = time.perf_counter()
                loss = train_step(run, micro)
                run.state.position += run.global_batch
                samples_per_s = run.global_batch / (time.perf_counter() - step_started)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                                         samples_per_s=f"{samples_per_s:.1f}", refresh=False)  # drawn by update
                    progress.update(1)
                on_step_end(run, loss, samples_per_s)
            if progress is not None:
                progress.close()
            if run.state.position < run.steps_per_epoch * run.global_batch:  # --max-steps inside the epoch
                evaluate_now(run)
                save(run)
                break
            run.state.epoch += 1
            run.state.position = 0
            end_of_epoch(run, *started)
        return summary(run)
    finally:
        if lock:
            lock.release()
        distributed.teardown(run.dist)


# ------------------------------------------------------------------------------------------------------ setup
def prepare(run: Run) -> None:
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    resume_from = resume_checkpoint(cfg)
    run.task = task = get_task(cfg.task, cfg.prompt_template)
    # data first (a mistake in it is found before a model download): the task's examples of each split
    columns = Columns(cfg.question_column, cfg.answers_column, cfg.image_column)
    read = dict(fmt=cfg.format, fail=cfg.on_bad_example == "fail", config=cfg.dataset_config, columns=columns,
                log=lambda message: say(run, message))
    train_split, train_examples = load_examples(task, cfg.dataset, cfg.train_split, training=True, **read)
    eval_split, eval_examples = load_examples(task, cfg.dataset, cfg.eval_split, training=False,
                                              limit=cfg.eval_limit, **read)
    # then the checkpoint and its processor (the encoder's positions grown for --image-size if needed); LoRA
    # resumes on the unmerged base model (its adapters come from the checkpoint)
    source = cfg.model if cfg.lora or not resume_from else resume_from
    module, processor = load_model(str(source), None if resume_from and not cfg.lora else cfg.revision,
                                   cfg.attn_implementation)
    if resume_from is not None and cfg.image_size is not None and processor.image_size != cfg.image_size \
            and not cfg.lora:
        raise DataError(f"{resume_from} was trained at {processor.image_size[0]}x{processor.image_size[1]}; resume "
                        "it with the same --image-size")
    processor = fit_size(module, processor, cfg.image_size, [e.prompt for e in train_examples + eval_examples],
                         cfg.max_prompt_tokens)
    positions = module.config.text.max_position_embeddings
    target_tokens = min(cfg.max_target_tokens or task.max_target_tokens, positions)
    run.max_new_tokens = min(cfg.max_new_tokens or task.max_new_tokens, positions)
    run.processor = processor
    run.train_set = TaskDataset(train_split, train_examples, processor, cfg.max_prompt_tokens, target_tokens)
    run.eval_set = TaskDataset(eval_split, eval_examples, processor, cfg.max_prompt_tokens, target_tokens)
    run.categories = eval_split.categories
    run.state = ckpt.TrainingState(step=0, epoch=0, position=0, best_score=None, best_step=None,
                                   skipped_examples=len(train_split.problems), optimizer={}, scheduler={}, rng={})

    # the model: on the device, the tower frozen for real (requires_grad False, eval mode), LoRA, wrapped
    run.module = module = module.to(run.device)
    if cfg.gradient_checkpointing:
        module.set_gradient_checkpointing(True)
    if not cfg.train_vision:
        module.vision_tower.requires_grad_(False)
    if not cfg.train_text_encoder:
        module.language_model.encoder.requires_grad_(False)
    if cfg.lora:
        from .lora import add_lora, load_adapter

        targets = tuple(t.strip() for t in cfg.lora_target_modules.split(",") if t.strip())
        add_lora(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.train_vision)
        if resume_from is not None:
            load_adapter(module, resume_from)
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    run.model = distributed.wrap(module, cfg.strategy, run.dist)
    # after LoRA and FSDP wrapping: the kernels check the layers they reach, and stay off where they are wrapped
    kernels.use(module, "training", strict=False)
    if cfg.feature_cache != "none":
        run.cache = FeatureCache(cfg.output_dir / "feature-cache" if cfg.feature_cache == "disk" else None)
    say(run, f"parameters: {trainable:,} trainable of {total:,} total "
             f"(vision tower {'trained' if cfg.train_vision else 'frozen'}"
             f"{'' if cfg.train_text_encoder else ', text encoder frozen'})")
    run.lengths = run.train_set.text_lengths() if cfg.group_by_length else None
    run.global_batch = cfg.batch_size * run.dist.world_size * cfg.grad_accum
    say(run, f"data: {len(run.train_set)} training and {len(run.eval_set)} evaluation examples of {task.token} "
             f"({train_split.description}); images {processor.image_size[0]}x{processor.image_size[1]}")

    run.steps_per_epoch = EpochSampler(len(run.train_set), cfg.batch_size, cfg.seed,
                                       world_size=run.dist.world_size).global_batches() // cfg.grad_accum
    if run.steps_per_epoch == 0:
        raise DataError(f"the training split has {len(run.train_set)} examples, fewer than one optimizer step "
                        f"({run.global_batch} examples)")
    run.total_steps = run.steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        run.total_steps = min(run.total_steps, cfg.max_steps)
    run.optimizer, run.scheduler = optimizer_and_schedule(run)
    if resume_from is not None:
        restore(run, resume_from)


def optimizer_and_schedule(run: Run):
    """The optimizer of the model's trainable weights, and its linear schedule: warm-up (none by default), then
    decay to 0 at the last step."""
    cfg = run.cfg
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups(run), lr=cfg.lr, momentum=0.9, nesterov=True,
                                    weight_decay=cfg.weight_decay)
    else:
        # fused: one kernel per step for all the weights (CPU and CUDA), instead of one loop over them per
        # operation: 13 against 68 ms a step for the demo's 13.7M weights on this machine's CPU
        optimizer = torch.optim.AdamW(param_groups(run), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    warmup, total_steps = cfg.warmup_steps, run.total_steps

    def linear(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear)


def param_groups(run: Run) -> list[dict]:
    """The trainable weights in optimizer groups: the vision tower at --vision-lr and the token embedding with
    --embedding-eps when they are given, everything else (all of it by default) in one group at --lr."""
    cfg, module = run.cfg, run.module
    embedding = module.language_model.shared.weight
    vision = {id(p) for p in module.vision_tower.parameters()} if cfg.vision_lr is not None else set()
    groups = {"rest": [], "vision": [], "embedding": []}  # the first group's lr is the one logged
    for p in module.parameters():
        if p.requires_grad:
            part = ("embedding" if p is embedding and cfg.embedding_eps is not None else
                    "vision" if id(p) in vision else "rest")
            groups[part].append(p)
    settings = {"rest": {}, "vision": {"lr": cfg.vision_lr}, "embedding": {"eps": cfg.embedding_eps}}
    return [{"params": params, **settings[part]} for part, params in groups.items() if params]


def resume_checkpoint(cfg: TrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(cfg.output_dir)  # None: nothing saved yet, start from scratch
    path = Path(cfg.resume)
    if not (path / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume {path}: not a training checkpoint (no training_state.pt)")
    return path


def restore(run: Run, folder: Path) -> None:
    saved = ckpt.load_training_state(folder)
    trainer = json.loads((folder / "trainer.json").read_text())
    if trainer.get("global_batch") != run.global_batch:
        raise DataError(f"{folder} was trained with a global batch of {trainer.get('global_batch')} examples "
                        f"(batch x ranks x accumulation); this run has {run.global_batch}: keep it equal to "
                        "resume exactly (adjust --batch-size or --grad-accum for the new number of ranks)")
    distributed.load_optimizer_state(run.model, run.optimizer, saved.optimizer, run.dist)
    run.scheduler.load_state_dict(saved.scheduler)
    ckpt.set_rng_state(saved.rng)
    run.state = saved
    say(run, f"resumed from {folder}: step {saved.step}, epoch {saved.epoch}, sample {saved.position}")


# --------------------------------------------------------------------------------------------------- training
def train_step(run: Run, micro: list) -> float:
    """One optimizer step over the `micro` batches (gradients reduced across ranks on the last one only)."""
    cfg = run.cfg
    run.model.train()
    if not cfg.train_vision:
        run.module.vision_tower.eval()  # frozen means deterministic too: no stochastic depth
    if not cfg.train_text_encoder:
        run.module.language_model.encoder.eval()  # and no dropout
    count_bad(run, micro)
    tokens = target_tokens(micro)
    total_tokens = distributed.all_reduce_sum(torch.full((), float(tokens), device=run.device), run.dist)
    step_loss = torch.zeros((), device=run.device)
    for i, batch in enumerate(micro):
        batch = batch.to(run.device)
        with distributed.no_sync(run.model, skip=i < len(micro) - 1):
            with autocast(run.device, run.bf16):
                if len(batch):
                    summed = loss_sum(run.model, batch, image_inputs(run, batch))
                else:  # every example of this micro-batch was bad: take part in the step with no gradient
                    summed = sum(p.sum() for p in run.model.parameters() if p.requires_grad) * 0.0
            loss = summed / total_tokens.clamp(min=1) * run.dist.world_size  # ranks' gradients are averaged
            loss.backward()
        step_loss += summed.detach()
    step_loss = distributed.all_reduce_sum(step_loss, run.dist) / total_tokens.clamp(min=1)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                 else torch.zeros((), device=run.device))
    if isinstance(grad_norm, DTensor):  # FSDP2: the norm of the sharded gradients, reduced over the ranks here
        grad_norm = grad_norm.full_tensor()
    loss_value, norm_value = step_values(step_loss, grad_norm)
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.state.step += 1
    if not finite:
        handle_nan(run, loss_value)
    return loss_value


def target_tokens(micro: list) -> int:
    """The target tokens (labels != -100) of a step's micro-batches, counted on the loader's CPU batches before
    they go to the device: host memory, no device sync."""
    return sum(int((b.labels != IGNORE_INDEX).sum()) for b in micro)


def step_values(step_loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float]:
    """The step's loss and gradient norm on the host, for the finite check before the update and for the log: the
    one device-to-host read of a step (the CPU waits for the GPU here, once)."""
    loss, norm = torch.stack([step_loss.float(), grad_norm.float()]).tolist()
    return loss, norm


def image_inputs(run: Run, batch) -> dict:
    """The image part of the model inputs: pixels when the tower trains; otherwise the frozen tower's features,
    computed without autograd (from the cache when there is one)."""
    if run.cfg.train_vision:
        return {"pixel_values": batch.pixel_values}
    if run.cache is not None:
        return {"vision_features": run.cache.features(run.module.vision_tower, batch.image_keys,
                                                      batch.pixel_values)}
    return {"vision_features": frozen_features(run.module.vision_tower, batch.pixel_values)}


def handle_nan(run: Run, loss: float) -> None:
    message = f"step {run.state.step}: non-finite loss or gradient ({loss}); the weights were not updated"
    log(run, {"step": run.state.step, "skipped_step": True, "reason": "non-finite loss or gradient"})
    if run.cfg.on_nan == "skip":
        say(run, message + "; step skipped (--on-nan skip)")
        return
    save(run)
    raise FloatingPointError(message + "; stopped after saving a checkpoint (--on-nan stop)")


def count_bad(run: Run, micro: list) -> None:
    errors = [e for b in micro for e in b.errors]
    if not errors:
        return
    if run.cfg.on_bad_example == "fail":
        raise DataError(f"bad training example ({errors[0]}); use --on-bad-example skip to skip such examples")
    run.state.skipped_examples += len(errors)
    for e in errors:
        say(run, f"skipped {e}")


def on_step_end(run: Run, loss: float, samples_per_s: float) -> None:
    cfg, step = run.cfg, run.state.step
    run.pending_losses.append(loss)
    if step % cfg.log_every == 0 or step == run.total_steps:
        losses = [x for x in run.pending_losses if math.isfinite(x)]
        log(run, {"step": step, "epoch": run.state.epoch,
                  "train_loss": sum(losses) / len(losses) if losses else float("nan"),
                  "lr": run.scheduler.get_last_lr()[0], "samples_per_s": samples_per_s})
        run.pending_losses = []
    if cfg.eval_every and step % cfg.eval_every == 0:
        evaluate_now(run)
    if cfg.save_every and step % cfg.save_every == 0:
        save(run)


def end_of_epoch(run: Run, started: float, position: int, misses: int) -> None:
    seconds = time.perf_counter() - started
    record = {"step": run.state.step, "epoch": run.state.epoch, "epoch_seconds": seconds,
              "epoch_samples_per_s": (run.steps_per_epoch * run.global_batch - position) / seconds}
    if run.cache is not None:  # images that went through the vision tower this epoch
        record["vision_tower_images"] = run.cache.misses - misses
    log(run, record)
    evaluate_now(run)
    save(run)


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate_now(run: Run) -> dict:
    cfg = run.cfg
    result = {"step": run.state.step, "epoch": run.state.epoch, **evaluate(
        run.model, run.module, run.processor, run.eval_set, run.task, run.categories, dist=run.dist,
        device=run.device, bf16=run.bf16, image_inputs=lambda batch: image_inputs(run, batch),
        batch_size=cfg.eval_batch_size or cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
        num_beams=cfg.num_beams, max_new_tokens=run.max_new_tokens, fail=cfg.on_bad_example == "fail",
        output_dir=cfg.output_dir)}
    log(run, result)
    if run.dist.is_main:
        from .plot import plot_metrics

        plot_metrics(cfg.output_dir / "metrics.jsonl", cfg.output_dir / "metrics.png", run.task.primary)
    run.last_eval = result
    return result


# ------------------------------------------------------------------------------------------ output and saving
def save(run: Run) -> Path | None:
    cfg, state = run.cfg, run.state
    state.optimizer = distributed.optimizer_state(run.model, run.optimizer, run.dist)
    state.scheduler = run.scheduler.state_dict()
    state.rng = ckpt.rng_state()
    weights = distributed.full_state_dict(run.model, run.dist)
    folder = None
    if run.dist.is_main:
        def write_model(tmp: Path) -> None:
            if cfg.lora:
                from safetensors.torch import save_file

                from .lora import ADAPTER_FILE, adapter_state, merged_state_dict

                save_file(adapter_state(weights), str(tmp / ADAPTER_FILE))
                run.module.save_pretrained(tmp, merged_state_dict(weights, cfg.lora_alpha / cfg.lora_rank))
            else:
                run.module.save_pretrained(tmp, state_dict=weights)
            run.processor.save_pretrained(tmp)

        trainer = {**cfg.to_json(), "global_batch": run.global_batch, "world_size": run.dist.world_size}
        folder = ckpt.save_checkpoint(cfg.output_dir, state, write_model, trainer, cfg.keep_last)
        primary = run.task.primary
        score = run.last_eval.get(f"eval_{primary}")
        if score is not None and math.isfinite(score) and run.last_eval["step"] == state.step and (
                state.best_score is None
                or (score > state.best_score if run.task.higher_is_better else score < state.best_score)):
            state.best_score, state.best_step = score, state.step
            ckpt.update_best(cfg.output_dir, folder)
            say(run, f"best {TITLES.get(primary, primary)} so far: {score:.4f} at step {state.step} -> "
                     f"{cfg.output_dir / 'best'}")
    state.optimizer, state.scheduler = {}, {}
    distributed.barrier(run.dist)
    return folder


def log(run: Run, record: dict) -> None:
    if not run.dist.is_main:
        return
    run.cfg.output_dir.mkdir(parents=True, exist_ok=True)
    with open(run.cfg.output_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    run.log_lines.append(record)
    say(run, shown(record))


def progress_bar(run: Run):
    """A bar over all the run's steps (one per epoch, each starting where the run is), showing the expected time to
    the last step from the first step on. In a terminal it redraws in place ten times a second; when stderr is a
    file or a pipe, tqdm still writes every redraw (after a carriage return, with no newline, so a log holds one
    growing line), hence there at most one redraw a minute."""
    if not run.dist.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.state.step, desc=f"epoch {run.state.epoch + 1}/{run.cfg.epochs}",
                unit="step", file=sys.stderr, dynamic_ncols=True, leave=False,
                mininterval=0.1 if sys.stderr.isatty() else 60.0)


def say(run: Run, message: str) -> None:
    if run.dist.is_main:
        print(message, flush=True)


def summary(run: Run) -> dict:
    primary = f"eval_{run.task.primary}"
    evals = [r for r in run.log_lines if primary in r]
    result = {"steps": run.state.step, "skipped_examples": run.state.skipped_examples, "metric": run.task.primary,
              "best_score": run.state.best_score, "best_step": run.state.best_step}
    if evals:
        result.update(first_eval=evals[0], last_eval=evals[-1])
    say(run, json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    if len(evals) > 1:
        say(run, report(evals[0], evals[-1], run.task.primary))
    if run.state.skipped_examples:
        say(run, f"{run.state.skipped_examples} bad examples were skipped (see the log above)")
    return result


TITLES = {"anls": "ANLS", "map": "mAP", "cider": "CIDEr", "cer": "CER"}  # how the primary metrics are written


def report(first: dict, last: dict, metric: str) -> str:
    """The task's metric at the first and the last evaluation, overall and per question type when it has them."""
    lines = [f"validation {TITLES.get(metric, metric)}, step {first['step']} -> step {last['step']}:",
             f"  {'all':16s} {first[f'eval_{metric}']:.3f} -> {last[f'eval_{metric}']:.3f}"]
    for kind, score in last.get(f"eval_{metric}_by_type", {}).items():
        before = first.get(f"eval_{metric}_by_type", {}).get(kind, float("nan"))
        lines.append(f"  {kind:16s} {before:.3f} -> {score:.3f}")
    return "\n".join(lines)
