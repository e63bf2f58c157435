"""The data weight reconstruction learns from: UNet inputs across timesteps, and one block's I/O.

Q-Diffusion's observation is that a diffusion model's activations change with the timestep, so
calibration data must cover the whole trajectory: `UNetInputCollector` keeps a uniform random
subset of the UNet's inputs (x_t, t and any text context) at the calibration steps of the
full-precision trajectories that `calibrate` samples anyway (one set of trajectories serves the
activation scales and the weights).

Block reconstruction then needs, per block, its inputs in the partly quantized model and its
float outputs for every kept sample. `SampleStore` holds one block's tensors at a time, in memory
or, above a byte budget, in memory-mapped files in a temporary directory: peak memory is set by
the largest block and the budget, not by the number of blocks.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class CalibrationInputs:
    """UNet inputs at calibration timesteps: x [N, ...], t [N] and context [N, ...] or None."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, index: slice | torch.Tensor, device: torch.device) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) of a UNet call on the samples `index`."""
        args = (self.x[index].to(device), self.t[index].to(device))
        if self.context is None:
            return args, {}
        return args, {"context": self.context[index].to(device)}


class UNetInputCollector:
    """A forward pre-hook on the UNet keeping `per_chunk` random samples of each (batch, calibration
    step) call, so every step contributes equally; `inputs(samples)` trims to exactly `samples`."""

    def __init__(self, model: nn.Module, steps: Sequence[int], samples: int, n_batches: int, seed: int):
        self.model, self.steps = model, set(steps)
        self.per_chunk = max(1, math.ceil(samples / (n_batches * max(len(self.steps), 1))))
        self.generator = torch.Generator().manual_seed(int(seed) + 104729)
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.calls = 0

    def attach(self, model: nn.Module) -> list[Any]:
        """Hook `model` (the collectors' shared model); returns the handles to remove."""
        return [model.register_forward_pre_hook(self._hook, with_kwargs=True)]

    def _new_trajectory(self, *_: object) -> None:
        self.calls = 0

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        step, self.calls = self.calls, self.calls + 1
        if step not in self.steps:
            return
        x, t = args[0], args[1]
        context = args[2] if len(args) > 2 else kwargs.get("context")
        keep = torch.randperm(x.shape[0], generator=self.generator)[: self.per_chunk].to(x.device)
        self.chunks.append(
            (
                x[keep].detach().float().cpu(),
                t.reshape(-1).expand(x.shape[0])[keep].detach().cpu(),
                None if context is None else context[keep].detach().float().cpu(),
            )
        )

    def inputs(self, samples: int) -> CalibrationInputs:
        """Exactly `samples` (or all, if fewer were seen) of the kept inputs, in a seeded random order."""
        x = torch.cat([c[0] for c in self.chunks])
        t = torch.cat([c[1] for c in self.chunks])
        context = None if self.chunks[0][2] is None else torch.cat([c[2] for c in self.chunks])
        if x.shape[0] < samples:
            log.warning(
                "weight reconstruction asked for %d samples, the trajectories gave %d (--cali-n x --cali-st "
                "calibration steps): raise --cali-n or --cali-st for more",
                samples,
                x.shape[0],
            )
        order = torch.randperm(x.shape[0], generator=self.generator)[:samples]
        return CalibrationInputs(x[order], t[order], None if context is None else context[order])


class SampleStore:
    """`count` samples of a fixed structure (tensors batched on dim 0, other values constant),
    in memory, or in memory-mapped `.npy` files once the estimated size exceeds `budget_bytes`."""

    def __init__(self, count: int, budget_bytes: int):
        self.count, self.budget = count, budget_bytes
        self.slots: list[torch.Tensor | Any] | None = None
        self.is_tensor: list[bool] = []
        self.spill: tempfile.TemporaryDirectory | None = None

    @property
    def on_disk(self) -> bool:
        return self.spill is not None

    def _allocate(self, values: Sequence[Any]) -> None:
        self.is_tensor = [isinstance(v, torch.Tensor) for v in values]
        per_sample = sum(v[0].numel() * 4 for v, t in zip(values, self.is_tensor, strict=True) if t)
        if per_sample * self.count > self.budget:
            self.spill = tempfile.TemporaryDirectory(prefix="modiff-recon-")
        self.slots = []
        for i, (value, tensor) in enumerate(zip(values, self.is_tensor, strict=True)):
            if not tensor:
                self.slots.append(value)
                continue
            shape = (self.count, *value.shape[1:])
            if self.spill is None:
                self.slots.append(torch.empty(shape, dtype=torch.float32))
            else:
                path = Path(self.spill.name) / f"{i}.npy"
                mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
                self.slots.append(torch.from_numpy(mapped))

    def write(self, start: int, values: Sequence[Any]) -> None:
        """Store a batch of samples at rows start.. (the first call fixes the structure)."""
        if self.slots is None:
            self._allocate(values)
        for slot, value, tensor in zip(self.slots, values, self.is_tensor, strict=True):
            if tensor:
                slot[start : start + value.shape[0]] = value.detach().float().cpu()

    def read(self, index: torch.Tensor | slice, device: torch.device) -> list[Any]:
        """The samples `index`, tensors on `device`."""
        return [
            slot[index].to(device) if tensor else slot for slot, tensor in zip(self.slots, self.is_tensor, strict=True)
        ]

    def close(self) -> None:
        """Drop the tensors (and the spill files)."""
        self.slots = None
        if self.spill is not None:
            self.spill.cleanup()
            self.spill = None
