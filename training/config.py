"""The trainer's configuration: one frozen dataclass, filled from the command line.

Presets (presets.py) are applied as the parser's defaults before the command line is parsed, so a flag given
explicitly always wins over the preset: `--preset demo --lr 1e-6 --epochs 7` trains at 1e-6 for 7 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from florence2 import cli

from . import distributed
from .formats import FORMATS
from .lora import DEFAULT_TARGETS


@dataclass(frozen=True)
class TrainConfig:
    output_dir: Path
    task: str
    preset: str | None
    # model
    model: str
    revision: str | None
    train_vision: bool
    train_text_encoder: bool
    gradient_checkpointing: bool
    lora: bool
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: str
    attn_implementation: str
    strategy: str
    feature_cache: str
    image_size: tuple[int, int] | None
    # data
    dataset: str
    format: str
    dataset_config: str | None
    train_split: str
    eval_split: str
    question_column: str
    answers_column: str
    image_column: str
    prompt_template: str | None
    max_prompt_tokens: int | None
    max_target_tokens: int | None
    num_workers: int
    group_by_length: bool
    on_bad_example: str
    # recipe
    epochs: int
    batch_size: int
    grad_accum: int
    lr: float
    optimizer: str
    vision_lr: float | None
    embedding_eps: float | None
    weight_decay: float
    warmup_steps: int
    max_grad_norm: float
    precision: str
    on_nan: str
    seed: int
    device: str | None
    # evaluation and checkpoints
    eval_every: int
    eval_limit: int | None
    eval_batch_size: int | None
    eval_before_training: bool
    num_beams: int
    max_new_tokens: int | None
    log_every: int
    save_every: int
    keep_last: int
    resume: str | None
    max_steps: int | None

    def to_json(self) -> dict:
        """Plain JSON values (trainer.json of every checkpoint)."""
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def build_parser(prog: str, description: str, task: str | None, presets: dict, required: bool = True):
    p = cli.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
               add_help=required)  # the first, lenient pass leaves --help to the real one
    p.add_argument("--task", default=task, required=required and task is None,
                   help="the task token: <OD>, <CAPTION>, <OCR_WITH_REGION>, ... or <DocVQA>, <VQA>, any prompt "
                        "(question answering)" + (f"; default {task}" if task else ""))
    names = sorted({name for name, _ in presets})
    p.add_argument("--preset", choices=names, default=None,
                   help="; ".join(f"{name} ({t}): {preset.help}" for (name, t), preset in sorted(presets.items())))
    p.add_argument("--output-dir", type=Path, required=required, help="metrics, plot and checkpoints go here")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="microsoft/Florence-2-base-ft", help="hub id or local checkpoint folder")
    g.add_argument("--revision", default=None, help="hub revision of --model")
    g.add_argument("--train-vision", action=argparse.BooleanOptionalAction, default=False,
                   help="also train the vision tower (default: frozen for real, as the blog intended)")
    g.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="train the language model's encoder, over the image tokens and the prompt (default); "
                        "--no-train-text-encoder freezes it (requires_grad False, eval mode)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations to save memory")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False,
                   help="train LoRA adapters instead of the weights (needs peft); "
                   "checkpoints hold the merged weights")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=8.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-target-modules", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated linear layer names (language model only unless --train-vision)")
    g.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument("--strategy", choices=distributed.STRATEGIES, default="ddp",
                   help="with torchrun: ddp (replicate) or fsdp (FSDP2 fully_shard: shard weights, gradients and "
                        "optimizer state, for large and for memory)")
    g.add_argument("--feature-cache", choices=["none", "memory", "disk"], default="none",
                   help="with the vision tower frozen, compute each image's vision features once and reuse them "
                        "across examples and epochs: in memory, or on disk under OUTPUT_DIR/feature-cache")
    g.add_argument("--image-size", type=cli.image_size, default=None, metavar="S|HxW",
                   help="train and evaluate at this size (a side, or height x width; multiples of 32; default: the "
                        "checkpoint's). Up to 1600 px a side (DaViT's position table); the text encoder's position "
                        "table grows if the image tokens and prompts do not fit it. The checkpoint records the size")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="HuggingFaceM4/DocumentVQA",
                   help="a COCO, JSONL or YOLO folder, a hub id, a save_to_disk folder or data files")
    g.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                   help="auto: told by the dataset's files")
    g.add_argument("--dataset-config", default=None, help="hub config name (e.g. 'docvqa' for the_cauldron)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--eval-split", default="validation", help="also found as valid or val")
    g.add_argument("--question-column", default="question", help="question answering datasets")
    g.add_argument("--answers-column", default="answers")
    g.add_argument("--image-column", default="image")
    g.add_argument("--prompt-template", default=None,
                   help="question answering: the prompt, with {question} (default: the task token + {question})")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="truncate prompts (default: what the encoder allows beside the image tokens)")
    g.add_argument("--max-target-tokens", type=int, default=None,
                   help="truncate targets (default: the task's, 256 for questions, else 1024; at most the decoder's "
                        "positions)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
                   help="batch examples of similar prompt+target length together, to cut padding")
    g.add_argument("--on-bad-example", choices=["skip", "fail"], default="skip",
                   help="a bad annotation or image: skip and count it, or stop with its file and line or id")
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
                   help="auto: bf16 autocast on a CUDA GPU with bf16 (Ampere and later), float32 on older GPUs and on "
                        "the CPU; bf16: bf16 autocast on any device; fp32: float32")
    g.add_argument("--on-nan", choices=["skip", "stop"], default="skip",
                   help="a non-finite loss or gradient: skip the step, or save and stop")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only each epoch)")
    g.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N examples only")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--eval-before-training", action=argparse.BooleanOptionalAction, default=False,
                   help="evaluate once at step 0")
    g.add_argument("--num-beams", type=int, default=3, help="beams of the evaluation's generations")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit of the evaluation's generations (default: the task's, 64 for questions, "
                        "else 1024; at most the decoder's positions)")
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: each epoch)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept besides best/ (0 keeps all)")
    g.add_argument("--resume", default=None,
                   help="a checkpoint folder, or 'auto' for the newest complete one in --output-dir")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (for tests)")
    return p


def parse_config(argv, *, prog: str, description: str, presets: dict, task: str | None = None,
                 preset: str | None = None) -> TrainConfig:
    """The configuration of `argv`: the parser's defaults, then the preset's (`presets[(name, task)].defaults` of
    what the command line asks for), then the command line."""
    lenient = build_parser(prog, description, task, presets, required=False)
    # a switch not on the command line is None here, so that a preset can tell it from --no-<switch>
    lenient.set_defaults(**{action.dest: None for action in lenient._actions
                            if isinstance(action, argparse.BooleanOptionalAction)})
    first, _ = lenient.parse_known_args(argv)
    parser = build_parser(prog, description, task, presets)
    name = first.preset or preset
    if (name, first.task) not in presets:
        if first.preset is not None:
            tasks = sorted(t for n, t in presets if n == name)
            parser.error(f"--preset {name} is for --task {' or '.join(tasks)}, not {first.task}")
        name = None  # the command's default preset, for another task: none
    if name is not None and first.output_dir is not None:
        parser.set_defaults(**presets[(name, first.task)].defaults(first))
    args = parser.parse_args(argv)
    args.preset = name
    validate(args, parser)
    return TrainConfig(**vars(args))


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.feature_cache != "none" and args.train_vision:
        parser.error("--feature-cache needs a frozen vision tower (drop --train-vision)")
    if args.lora and not args.train_text_encoder:
        parser.error("--no-train-text-encoder is for full fine-tuning: with --lora the weights are frozen already "
                     "and the adapters go on the encoder's layers too")
    if args.vision_lr is not None and not args.train_vision:
        parser.error("--vision-lr needs --train-vision (the vision tower is frozen otherwise)")
    if args.embedding_eps is not None and args.optimizer != "adamw":
        parser.error("--embedding-eps is AdamW's (drop --optimizer sgd)")
    for name in ("vision_lr", "embedding_eps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("epochs", "batch_size", "grad_accum", "log_every", "num_beams", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("num_workers", "eval_every", "save_every", "keep_last", "warmup_steps", "eval_limit"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("max_prompt_tokens", "max_target_tokens", "max_new_tokens", "eval_batch_size", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    if args.prompt_template is not None and "{question}" not in args.prompt_template:
        parser.error(f"--prompt-template {args.prompt_template!r} has no {{question}}")
