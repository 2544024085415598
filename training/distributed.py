"""Data parallelism with PyTorch's own engine: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, we join the process group
(NCCL on GPU, gloo on CPU) and wrap the model in DistributedDataParallel or FSDP2 (`fully_shard`)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (an immutable value)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, dev)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(items: list, d: Dist) -> list:
    """Concatenate every rank's list (on every rank)."""
    if not d.enabled:
        return items
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


# ------------------------------------------------------------------------------------------------ model wrapping
STRATEGIES = ("ddp", "fsdp")


def wrap(model: torch.nn.Module, strategy: str, d: Dist) -> torch.nn.Module:
    """The module to call for training steps. DDP replicates; FSDP2 shards every vision stage, every text layer
    and the rest (embeddings, projection) over the ranks. Without a process group the model is returned as is."""
    if not d.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        tower = model.vision_tower
        frozen = not any(p.requires_grad for p in tower.parameters())
        if not frozen:  # one unit per block (a stage is a ModuleList, which has no forward of its own to hook)
            for block in (b for stage in tower.blocks for b in stage):
                fully_shard(block)
        for layer in (*model.language_model.encoder.layers, *model.language_model.decoder.layers):
            fully_shard(layer)
        # A frozen tower is called on its own (outside the root's forward) and never updated: keep it whole
        fully_shard(model, ignored_params=set(tower.parameters()) if frozen else None)
        return model
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip: bool):
    """With `skip`, backward passes accumulate gradients locally without reducing them across ranks (the micro-steps
    of gradient accumulation before the last): DDP's no_sync, FSDP2's set_requires_gradient_sync(False)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if not skip:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Every FSDP-sharded weight gathered for the duration (generation calls submodules outside their forward, e.g.
    the cross-attention projections when it builds its cache). Nothing to do for DDP or one process."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def _options(d: Dist):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (unsharded) tensors on the CPU, keyed by parameter name: the same format for one process, DDP and FSDP,
    # so a checkpoint resumes under any strategy and number of ranks.
    return StateDictOptions(full_state_dict=True, cpu_offload=d.enabled)


def full_state_dict(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Every weight in full, on the CPU (with FSDP, rank 0 gets them and the other ranks an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=_options(d)).items()}


def optimizer_state(model: torch.nn.Module, optimizer, d: Dist) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(d))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
