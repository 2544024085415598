"""Fine-tune Florence-2 on DocVQA (or any dataset of the same shape).

    python -m training.docvqa --output-dir runs/docvqa                   # the blog's recipe, on the hub data
    python -m training.docvqa --preset demo --output-dir runs/demo       # offline: synthetic documents, small model
    torchrun --nproc_per_node=8 -m training.docvqa --output-dir runs/x  # data-parallel on 8 GPUs

Defaults are the recipe of the Hugging Face blog "Fine-tuning Florence-2" (Florence-2-base-ft, DocumentVQA, prompt
"<DocVQA>" + question, target answers[0], AdamW lr 1e-6 with linear decay and no warm-up, 7 epochs, batch 6),
without its bugs: the vision tower is really frozen (requires_grad False, and run in eval mode), padding is neither
attended nor counted in the loss, and ANLS is the official one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from florence2 import Florence2
from florence2.model import shift_right
from florence2.processor import Florence2Processor

from . import checkpoint as ckpt
from . import distributed
from .data import Collator, Columns, DataError, EpochSampler, QADataset, load_split
from .feature_cache import frozen_features
from .metrics import anls_per_question, levenshtein_similarity

DEMO_DATA, DEMO_CAPTIONS = "demo-data", "demo-captions"
DEMO_PRETRAIN = "pretrain"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.docvqa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["blog", "demo"], default="blog",
                   help="blog: the defaults below. demo: offline run on synthetic documents with a small model, "
                        "pretrained from scratch on captions of other synthetic pages, then fine-tuned, on the CPU "
                        "in about ten minutes (overrides the model, data and recipe)")
    p.add_argument("--output-dir", type=Path, required=True, help="metrics, plot and checkpoints go here")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="microsoft/Florence-2-base-ft", help="hub id or local checkpoint folder")
    g.add_argument("--revision", default=None, help="hub revision of --model")
    g.add_argument("--train-vision", action="store_true",
                   help="also train the vision tower (default: frozen for real, as the blog intended)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the weights (needs peft); "
                   "checkpoints hold the merged weights")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=8.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-target-modules", default="q_proj,k_proj,v_proj,out_proj,fc1,fc2",
                   help="comma-separated linear layer names (language model only unless --train-vision)")
    g.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument("--strategy", choices=distributed.STRATEGIES, default="ddp",
                   help="with torchrun: ddp (replicate) or fsdp (FSDP2 fully_shard: shard weights, gradients and "
                        "optimizer state, for large and for memory)")
    g.add_argument("--feature-cache", choices=["none", "memory", "disk"], default="none",
                   help="with the vision tower frozen, compute each image's vision features once and reuse them "
                        "across questions and epochs: in memory, or on disk under OUTPUT_DIR/feature-cache")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="HuggingFaceM4/DocumentVQA",
                   help="hub id, a save_to_disk folder, a parquet file or a folder of data files")
    g.add_argument("--dataset-config", default=None, help="hub config name (e.g. 'docvqa' for the_cauldron)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--eval-split", default="validation")
    g.add_argument("--question-column", default="question")
    g.add_argument("--answers-column", default="answers")
    g.add_argument("--image-column", default="image")
    g.add_argument("--prompt-template", default="<DocVQA>{question}", help="the prompt, with {question}")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="truncate prompts (default: what the encoder allows beside the image tokens)")
    g.add_argument("--max-target-tokens", type=int, default=256, help="truncate targets")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar prompt+answer length together, to cut padding")
    g.add_argument("--on-bad-example", choices=["skip", "fail"], default="skip",
                   help="an unreadable image or empty question/answers: skip and count it, or stop")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=7)
    g.add_argument("--batch-size", type=int, default=6, help="per device")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="adamw (the blog's), or SGD with Nesterov momentum 0.9")
    g.add_argument("--vision-lr", type=float, default=None,
                   help="learning rate of the vision tower with --train-vision (default: --lr). A DaViT trained from "
                        "scratch needs about 10x less than the text model")
    g.add_argument("--embedding-eps", type=float, default=None,
                   help="AdamW's eps for the token embedding, which is tied to the output layer (default: AdamW's "
                        "1e-8). Adam moves a weight by about lr per step however small its gradient: trained from "
                        "scratch on a small dataset, the rows of the tens of thousands of tokens it never uses get "
                        "only tiny gradients, all pushing the same way, and drift together until the encoder can no "
                        "longer tell tokens apart. With an eps above those gradients (the demo: 3e-4) they move in "
                        "proportion to their gradient instead, while the rows in use keep Adam's steps")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 disables")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU")
    g.add_argument("--on-nan", choices=["skip", "stop"], default="skip",
                   help="a non-finite loss or gradient: skip the step, or save and stop")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only each epoch)")
    g.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N examples only")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--eval-before-training", action="store_true", help="evaluate once at step 0")
    g.add_argument("--num-beams", type=int, default=3, help="beams for the ANLS generations")
    g.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit for the ANLS generations")
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: each epoch)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept besides best/ (0 keeps all)")
    g.add_argument("--resume", default=None,
                   help="a checkpoint folder, or 'auto' for the newest complete one in --output-dir")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (for tests)")
    args = p.parse_args(argv)
    if args.preset == "demo":
        apply_demo_preset(args, p)
    if args.feature_cache != "none" and args.train_vision:
        p.error("--feature-cache needs a frozen vision tower (drop --train-vision)")
    if args.vision_lr is not None and not args.train_vision:
        p.error("--vision-lr needs --train-vision (the vision tower is frozen otherwise)")
    if args.embedding_eps is not None and args.optimizer != "adamw":
        p.error("--embedding-eps is AdamW's (drop --optimizer sgd)")
    for name in ("vision_lr", "embedding_eps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("epochs", "batch_size", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    return args


def apply_demo_preset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The offline demo: a small Florence-2 on synthetic documents (see training/demo.py). Explicit flags still win."""
    demo = {"model": "demo", "dataset": str(args.output_dir / DEMO_DATA), "epochs": 3, "batch_size": 16,
            "optimizer": "adamw", "lr": 1e-3, "vision_lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 20,
            "eval_before_training": True, "num_beams": 1, "max_new_tokens": 12, "log_every": 5, "num_workers": 2,
            "train_vision": True, "prompt_template": "<DocVQA>{question}", "feature_cache": "none"}
    for name, value in demo.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if args.optimizer == "adamw" and args.embedding_eps is None:  # an AdamW setting: not for --optimizer sgd
        args.embedding_eps = 3e-4


# ------------------------------------------------------------------------------------------------ the run
class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dist = distributed.setup(args.device)
        self.device = self.dist.device
        self.output_dir = args.output_dir
        self.autocast = (self.device.type == "cuda" and args.precision in ("auto", "bf16"))
        self.log_lines: list[dict] = []

    # ---------------------------------------------------------------------------------------------- setup
    def build(self) -> None:
        args = self.args
        torch.manual_seed(args.seed)
        self.resume_from = self._resume_checkpoint()
        # LoRA resumes on the unmerged base model (its adapters come from the checkpoint)
        source = args.model if args.lora or not self.resume_from else self.resume_from
        if source == "demo":
            from .demo import demo_model, demo_processor

            self.processor = demo_processor()
            self.model = demo_model(self.processor, seed=args.seed)
        else:
            self.model = Florence2.from_pretrained(source, revision=None if self.resume_from else args.revision,
                                                   attn_implementation=args.attn_implementation)
            self.processor = Florence2Processor.from_pretrained(self.resume_from or source)
        self.module = self.model.to(self.device)
        if args.gradient_checkpointing:
            self.module.set_gradient_checkpointing(True)
        if not args.train_vision:
            self.module.vision_tower.requires_grad_(False)
        if args.lora:
            from .lora import add_lora, load_adapter

            targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
            add_lora(self.module, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, args.train_vision)
            if self.resume_from is not None:
                load_adapter(self.module, self.resume_from)
        total = sum(p.numel() for p in self.module.parameters())
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        self.model = distributed.wrap(self.module, args.strategy, self.dist)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.cache = None
        if args.feature_cache != "none":
            from .feature_cache import FeatureCache

            self.cache = FeatureCache(self.output_dir / "feature-cache" if args.feature_cache == "disk" else None)
        self.print(f"parameters: {trainable:,} trainable of {total:,} total "
                   f"(vision tower {'trained' if args.train_vision else 'frozen'})")
        self._build_data()
        if args.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.param_groups(), lr=args.lr, momentum=0.9, nesterov=True,
                                             weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.param_groups(), lr=args.lr, weight_decay=args.weight_decay)
        self.steps_per_epoch = self.train_sampler(0).global_batches() // args.grad_accum
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {len(self.train_set)} examples, fewer than one optimizer step "
                            f"({self.global_batch} examples)")
        self.total_steps = self.steps_per_epoch * args.epochs
        if args.max_steps is not None:
            self.total_steps = min(self.total_steps, args.max_steps)
        warmup, total_steps = args.warmup_steps, self.total_steps

        def linear(step: int) -> float:  # linear warm-up (none by default), then linear decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear)
        self.state = ckpt.TrainingState(step=0, epoch=0, position=0, best_anls=None, best_step=None,
                                        skipped_examples=0, optimizer={}, scheduler={}, rng={})
        if self.resume_from is not None:
            self._restore(self.resume_from)

    def param_groups(self) -> list[dict]:
        """The trainable weights in optimizer groups: the vision tower at --vision-lr and the token embedding with
        --embedding-eps when they are given, everything else (all of it by default) in one group at --lr."""
        args = self.args
        embedding = self.module.language_model.shared.weight
        vision = {id(p) for p in self.module.vision_tower.parameters()} if args.vision_lr is not None else set()
        groups = {"rest": [], "vision": [], "embedding": []}  # the first group's lr is the one logged
        for p in self.module.parameters():
            if p.requires_grad:
                part = ("embedding" if p is embedding and args.embedding_eps is not None else
                        "vision" if id(p) in vision else "rest")
                groups[part].append(p)
        settings = {"rest": {}, "vision": {"lr": args.vision_lr}, "embedding": {"eps": args.embedding_eps}}
        return [{"params": params, **settings[part]} for part, params in groups.items() if params]

    def _resume_checkpoint(self) -> Path | None:
        resume = self.args.resume
        if resume is None:
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.output_dir)  # None: nothing saved yet, start from scratch
        path = Path(resume)
        if not (path / "training_state.pt").is_file():
            raise FileNotFoundError(f"--resume {path}: not a training checkpoint (no training_state.pt)")
        return path

    def _restore(self, folder: Path) -> None:
        saved = ckpt.load_training_state(folder)
        trainer = json.loads((folder / "trainer.json").read_text())
        if trainer.get("global_batch") != self.global_batch:
            raise ValueError(f"{folder} was trained with a global batch of {trainer.get('global_batch')} examples "
                             f"(batch x ranks x accumulation); this run has {self.global_batch}: keep it equal to "
                             "resume exactly (adjust --batch-size or --grad-accum for the new number of ranks)")
        distributed.load_optimizer_state(self.model, self.optimizer, saved.optimizer, self.dist)
        self.scheduler.load_state_dict(saved.scheduler)
        ckpt.set_rng_state(saved.rng)
        self.state = saved
        self.print(f"resumed from {folder}: step {saved.step}, epoch {saved.epoch}, sample {saved.position}")

    def _build_data(self) -> None:
        args = self.args
        demo_data = {str(self.output_dir / DEMO_DATA): False, str(self.output_dir / DEMO_CAPTIONS): True}
        if args.preset == "demo" and args.dataset in demo_data:
            from .demo import ensure_demo_data

            if self.dist.is_main:
                ensure_demo_data(Path(args.dataset), seed=args.seed, captions=demo_data[args.dataset], log=self.print)
            distributed.barrier(self.dist)
        columns = Columns(args.question_column, args.answers_column, args.image_column)
        make = dict(processor=self.processor, prompt_template=args.prompt_template, columns=columns,
                    max_prompt_tokens=args.max_prompt_tokens, max_target_tokens=args.max_target_tokens)
        self.train_set = QADataset(load_split(args.dataset, args.train_split, args.dataset_config), **make)
        eval_split = load_split(args.dataset, args.eval_split, args.dataset_config)
        if args.eval_limit is not None:
            eval_split = eval_split.select(range(min(args.eval_limit, len(eval_split))))
        self.eval_set = QADataset(eval_split, **make)
        self.collate = Collator(self.processor.pad_token_id)
        self.lengths = self.train_set.text_lengths() if args.group_by_length else None
        self.global_batch = args.batch_size * self.dist.world_size * args.grad_accum
        self.print(f"data: {len(self.train_set)} training and {len(self.eval_set)} evaluation examples")

    def train_sampler(self, epoch: int, start: int = 0) -> EpochSampler:
        return EpochSampler(len(self.train_set), self.args.batch_size, self.args.seed, epoch, start,
                            self.dist.rank, self.dist.world_size, lengths=self.lengths)

    def loader(self, dataset, sampler, batch_size: int):
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.collate,
            num_workers=self.args.num_workers, pin_memory=self.device.type == "cuda",
            # a private generator: creating an iterator must not consume the global RNG (dropout), or a resumed
            # run would draw different dropout masks than the run it continues
            generator=torch.Generator().manual_seed(self.args.seed),
            persistent_workers=False, prefetch_factor=4 if self.args.num_workers else None)

    # --------------------------------------------------------------------------------------------- training
    def run(self) -> dict:
        args = self.args
        lock = ckpt.RunLock(self.output_dir) if self.dist.is_main else None
        if lock:
            lock.acquire()
            for leftover in ckpt.remove_leftovers(self.output_dir):
                self.print(f"removed {leftover}, left by an interrupted save")
        try:
            self.build()
            if args.eval_before_training and self.state.step == 0:
                self.evaluate()
            self.train()
            return self.summary()
        finally:
            if lock:
                lock.release()
            distributed.teardown(self.dist)

    def train(self) -> None:
        args = self.args
        micro_per_step = args.grad_accum
        while self.state.step < self.total_steps and self.state.epoch < args.epochs:
            self.epoch_started = (time.perf_counter(), self.state.position, self.cache.misses if self.cache else 0)
            sampler = self.train_sampler(self.state.epoch, self.state.position)
            batches = iter(self.loader(self.train_set, sampler, args.batch_size))
            progress = self.progress(self.state.epoch)
            while self.state.step < self.total_steps:
                micro = [b for b in (next(batches, None) for _ in range(micro_per_step)) if b is not None]
                if len(micro) < micro_per_step:
                    break  # end of epoch
                started = time.perf_counter()
                loss = self.train_step(micro)
                self.state.position += self.global_batch
                samples_per_s = self.global_batch / (time.perf_counter() - started)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                         samples_per_s=f"{samples_per_s:.1f}")
                self.on_step_end(loss, samples_per_s)
            if progress is not None:
                progress.close()
            if self.state.position < self.steps_per_epoch * self.global_batch:  # --max-steps inside the epoch
                self.evaluate()
                self.save()
                break
            self.state.epoch += 1
            self.state.position = 0
            self.end_of_epoch()

    def train_step(self, micro: list) -> float:
        """One optimizer step over `micro` batches. The loss is the sum of token losses over all micro-batches and
        ranks divided by their number of target tokens, so every token weighs the same whatever the padding."""
        self.model.train()
        if not self.args.train_vision:
            self.module.vision_tower.eval()  # frozen means deterministic too: no stochastic depth
        self._count_bad(micro)
        tokens = sum(int((b.labels != -100).sum()) for b in micro)
        total_tokens = distributed.all_reduce_sum(torch.tensor(float(tokens), device=self.device), self.dist)
        step_loss = torch.zeros((), device=self.device)
        for batch in micro:
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                if len(batch):
                    loss_sum = self.loss_sum(batch)
                else:  # every example of this micro-batch was bad: take part in the step with no gradient
                    loss_sum = sum(p.sum() for p in self.trainable) * 0.0
            loss = loss_sum / total_tokens.clamp(min=1) * self.dist.world_size  # ranks' gradients are averaged
            loss.backward()
            step_loss += loss_sum.detach()
        step_loss = distributed.all_reduce_sum(step_loss, self.dist) / total_tokens.clamp(min=1)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
                     if self.args.max_grad_norm > 0 else torch.zeros(()))
        finite = bool(torch.isfinite(step_loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        if not finite:
            self.handle_nan(float(step_loss))
        return float(step_loss)

    def loss_sum(self, batch) -> torch.Tensor:
        text = self.module.config.text
        decoder_input_ids = shift_right(batch.labels, text.decoder_start_token_id, text.pad_token_id)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         decoder_input_ids=decoder_input_ids, **self.image_inputs(batch))
        return F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum")

    def image_inputs(self, batch) -> dict:
        """The image part of the model inputs: pixels when the tower trains; otherwise the frozen tower's features,
        computed without autograd (from the cache when there is one)."""
        if self.args.train_vision:
            return {"pixel_values": batch.pixel_values}
        if self.cache is not None:
            return {"vision_features": self.cache.features(self.module.vision_tower, batch.image_keys,
                                                           batch.pixel_values)}
        return {"vision_features": frozen_features(self.module.vision_tower, batch.pixel_values)}

    def handle_nan(self, loss: float) -> None:
        message = f"step {self.state.step}: non-finite loss or gradient ({loss}); the weights were not updated"
        self.log({"step": self.state.step, "skipped_step": True, "reason": "non-finite loss or gradient"})
        if self.args.on_nan == "skip":
            self.print(message + "; step skipped (--on-nan skip)")
            return
        self.save()
        raise FloatingPointError(message + "; stopped after saving a checkpoint (--on-nan stop)")

    def _count_bad(self, micro: list) -> None:
        errors = [e for b in micro for e in b.errors]
        if not errors:
            return
        if self.args.on_bad_example == "fail":
            raise DataError(f"bad training example ({errors[0]}); use --on-bad-example skip to skip such examples")
        self.state.skipped_examples += len(errors)
        for e in errors:
            self.print(f"skipped {e}")

    def on_step_end(self, loss: float, samples_per_s: float) -> None:
        args, step = self.args, self.state.step
        self._pending = [*getattr(self, "_pending", []), loss]
        if step % args.log_every == 0 or step == self.total_steps:
            losses = [x for x in self._pending if math.isfinite(x)]
            self.log({"step": step, "epoch": self.state.epoch,
                      "train_loss": sum(losses) / len(losses) if losses else float("nan"),
                      "lr": self.scheduler.get_last_lr()[0], "samples_per_s": samples_per_s})
            self._pending = []
        if args.eval_every and step % args.eval_every == 0:
            self.evaluate()
        if args.save_every and step % args.save_every == 0:
            self.save()

    def end_of_epoch(self) -> None:
        started, position, misses = self.epoch_started
        seconds = time.perf_counter() - started
        record = {"step": self.state.step, "epoch": self.state.epoch, "epoch_seconds": seconds,
                  "epoch_samples_per_s": (self.steps_per_epoch * self.global_batch - position) / seconds}
        if self.cache is not None:  # images that went through the vision tower this epoch
            record["vision_tower_images"] = self.cache.misses - misses
        self.log(record)
        self.evaluate()
        self.save()

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        args = self.args
        self.model.eval()
        batch_size = args.eval_batch_size or args.batch_size
        # every rank runs the same number of batches (FSDP gathers weights collectively): the short ranks repeat
        # their first example, which is then left out of the loss and the records
        per_rank = -(-len(self.eval_set) // self.dist.world_size)
        indices = list(range(self.dist.rank, len(self.eval_set), self.dist.world_size))
        indices += indices[:1] * (per_rank - len(indices))
        loader = self.loader(self.eval_set, indices, batch_size)
        loss_sum, tokens, records, seen, bad = 0.0, 0, [], set(), []
        for batch in loader:
            bad += batch.errors
            if not len(batch):
                continue
            repeated = [i in seen for i in batch.indices]
            seen.update(batch.indices)
            batch = batch.to(self.device)
            batch.labels[torch.tensor(repeated, device=self.device)] = -100
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss_sum += float(self.loss_sum(batch))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), \
                    distributed.gathered(self.model):
                generated = self.module.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                 max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                                 **self.image_inputs(batch))
            tokens += int((batch.labels != -100).sum())
            predictions = [t.strip() for t in self.processor.batch_decode(generated, skip_special_tokens=True)]
            records += [{"index": i, "prediction": p, "answers": a, "type": t} for i, p, a, t, r in
                        zip(batch.indices, predictions, batch.answers, batch.question_types, repeated) if not r]
        totals = distributed.all_reduce_sum(torch.tensor([loss_sum, float(tokens)], dtype=torch.float64,
                                                         device=self.device), self.dist)
        records = sorted(distributed.gather_objects(records, self.dist), key=lambda r: r["index"])
        scores = anls_per_question([r["prediction"] for r in records], [r["answers"] for r in records])
        by_type: dict[str, list[float]] = {}
        for record, score in zip(records, scores):
            by_type.setdefault(record["type"], []).append(score)
        result = {"step": self.state.step, "epoch": self.state.epoch,
                  "eval_loss": float(totals[0] / totals[1]) if totals[1] else float("nan"),
                  "eval_anls": sum(scores) / len(scores) if scores else float("nan"),
                  "eval_anls_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
                  # the blog's metric, only to compare with its numbers: not ANLS
                  "eval_blog_similarity": levenshtein_similarity([r["prediction"] for r in records],
                                                                 [r["answers"] for r in records]) if records
                  else float("nan"),
                  "eval_examples": len(records)}
        bad = distributed.gather_objects(bad, self.dist)
        if bad:
            if args.on_bad_example == "fail":
                raise DataError(f"bad evaluation example ({bad[0]}); use --on-bad-example skip to skip such examples")
            result["eval_skipped_examples"] = len(bad)
        self.log(result)
        self.plot()
        self.last_eval = result
        if self.dist.is_main and records:
            (self.output_dir / "predictions.jsonl").write_text(
                "".join(json.dumps({**r, "anls": s}) + "\n" for r, s in zip(records, scores)))
        return result

    # ------------------------------------------------------------------------------------- output and saving
    def save(self) -> Path | None:
        self.state.optimizer = distributed.optimizer_state(self.model, self.optimizer, self.dist)
        self.state.scheduler = self.scheduler.state_dict()
        self.state.rng = ckpt.rng_state()
        weights = distributed.full_state_dict(self.model, self.dist)
        folder = None
        if self.dist.is_main:
            def write_model(tmp: Path) -> None:
                if self.args.lora:
                    from safetensors.torch import save_file

                    from .lora import ADAPTER_FILE, adapter_state, merged_state_dict

                    save_file(adapter_state(weights), str(tmp / ADAPTER_FILE))
                    self.module.save_pretrained(tmp, merged_state_dict(weights, self.args.lora_alpha /
                                                                        self.args.lora_rank))
                else:
                    self.module.save_pretrained(tmp, state_dict=weights)
                self.processor.save_pretrained(tmp)

            folder = ckpt.save_checkpoint(self.output_dir, self.state, write_model, self.trainer_args(),
                                          self.args.keep_last)
            anls = getattr(self, "last_eval", {}).get("eval_anls")
            if anls is not None and self.last_eval["step"] == self.state.step and (
                    self.state.best_anls is None or anls > self.state.best_anls):
                self.state.best_anls, self.state.best_step = anls, self.state.step
                ckpt.update_best(self.output_dir, folder)
                self.print(f"best ANLS so far: {anls:.4f} at step {self.state.step} -> {self.output_dir / 'best'}")
        self.state.optimizer, self.state.scheduler = {}, {}
        distributed.barrier(self.dist)
        return folder

    def trainer_args(self) -> dict:
        return {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
                "global_batch": self.global_batch, "world_size": self.dist.world_size}

    def log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.log_lines.append(record)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                          if not isinstance(v, dict))
        self.print(shown)

    def plot(self) -> None:
        if self.dist.is_main and (self.output_dir / "metrics.jsonl").is_file():
            from .plot import plot_metrics

            plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "metrics.png")

    def progress(self, epoch: int):
        if not self.dist.is_main:
            return None
        from tqdm import tqdm

        done = self.state.position // self.global_batch
        return tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{self.args.epochs}",
                    unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)

    def print(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def summary(self) -> dict:
        evals = [r for r in self.log_lines if "eval_anls" in r]
        result = {"steps": self.state.step, "skipped_examples": self.state.skipped_examples,
                  "best_anls": self.state.best_anls, "best_step": self.state.best_step}
        if evals:
            result.update(first_eval=evals[0], last_eval=evals[-1])
        if self.dist.is_main:
            self.print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
            if len(evals) > 1:
                self.print(anls_report(evals[0], evals[-1]))
            if self.state.skipped_examples:
                self.print(f"{self.state.skipped_examples} bad examples were skipped (see the log above)")
        return result


def anls_report(first: dict, last: dict) -> str:
    """Validation ANLS of the first and the last evaluation, overall and per question type."""
    lines = [f"validation ANLS, step {first['step']} -> step {last['step']}:",
             f"  {'all':16s} {first['eval_anls']:.3f} -> {last['eval_anls']:.3f}"]
    for kind, score in last["eval_anls_by_type"].items():
        lines.append(f"  {kind:16s} {first['eval_anls_by_type'].get(kind, float('nan')):.3f} -> {score:.3f}")
    return "\n".join(lines)


def pretrain_demo_model(args: argparse.Namespace) -> Path:
    """The demo's first stage: the small model, from scratch, learns `<CAPTION>` on synthetic pages of its own (what
    kind of document, the header colour, title, table rows, stamp, signature), as Florence-2 was pretrained on image
    descriptions before any fine-tuning. Returns its last checkpoint; a finished stage is reused (--resume auto)."""
    from .demo import PRETRAIN_EPOCHS

    stage_dir = args.output_dir / DEMO_PRETRAIN
    stage = argparse.Namespace(**{**vars(args), "output_dir": stage_dir, "dataset": str(stage_dir / DEMO_CAPTIONS),
                                  "prompt_template": "{question}", "epochs": PRETRAIN_EPOCHS, "resume": "auto",
                                  "eval_before_training": False, "max_new_tokens": 40})
    Trainer(stage).run()
    return ckpt.latest_checkpoint(stage_dir)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.preset == "demo" and args.model == "demo":
        args.model = str(pretrain_demo_model(args))
    return Trainer(args).run()


if __name__ == "__main__":
    main()
