"""Frozen-encoder feature cache.

While the vision tower is frozen (the default), its output for an image never changes, yet a plain loop recomputes
it every epoch for every question about the image (7 epochs x several questions per DocVQA page). The cache keeps
each image's DaViT output the first time it is computed, keyed by a hash of the image bytes, and the rest of the
model is fed from it. In memory, or on disk as one safetensors file per image (memory-mapped when read back; the
files of one run can be shared by the processes of a node).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from florence2 import kernels


@torch.no_grad()
def frozen_features(vision_tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen tower's output (B, h, w, C), one image at a time: an image's features then do not depend on the
    other images of its batch (batched matmuls may round differently), so cached and recomputed features are
    bit-identical. It runs the inference kernels (in place, without a graph: the tower is frozen)."""
    was_training = vision_tower.training
    vision_tower.eval()
    with kernels.using(vision_tower, "inference", strict=False):
        features = torch.cat([vision_tower(pixel_values[i:i + 1]) for i in range(pixel_values.shape[0])])
    vision_tower.train(was_training)
    return features


class FeatureCache:
    def __init__(self, directory: Path | None = None):
        self.directory = directory
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        if self.directory is None:
            return len(self.memory)
        return sum(1 for p in self.directory.glob("*.safetensors"))

    def _get(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            return self.memory.get(key)
        path = self.directory / f"{key}.safetensors"
        return load_file(path)["features"] if path.is_file() else None

    def _put(self, key: str, features: torch.Tensor) -> None:
        if self.directory is None:
            self.memory[key] = features
            return
        path = self.directory / f"{key}.safetensors"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"features": features.contiguous()}, str(tmp))
        os.replace(tmp, path)  # concurrent writers of the same image write the same tensor

    @torch.no_grad()
    def features(self, vision_tower: torch.nn.Module, keys: list[str], pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's output (B, h, w, C) for the batch, computing only the images not seen before."""
        found = {k: self._get(k) for k in dict.fromkeys(keys)}  # an image asked twice in a batch is computed once
        missing = [k for k, f in found.items() if f is None]
        self.misses += len(missing)  # images computed
        self.hits += len(keys) - len(missing)  # lookups served without running the tower
        if missing:
            computed = frozen_features(vision_tower, pixel_values[[keys.index(k) for k in missing]])
            for key, features in zip(missing, computed):
                found[key] = features.detach().cpu()
                self._put(key, found[key])
        return torch.stack([found[k] for k in keys]).to(pixel_values.device, non_blocking=True)
