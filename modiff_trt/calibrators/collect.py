"""Streaming activation statistics from full-precision DDIM trajectories.

Why streaming: CIFAR-10 calibration (20 steps x 256 samples x 113 layers) is far more activation
data than fits in memory, so nothing is kept per sample. For every quantized layer and channel
group the collector keeps

- the exact absmax (all `minmax` needs, and the top of the MSE candidate ranges), and
- a bounded uniform random subsample of the values: every (step, batch) chunk contributes the same
  number of values, drawn with replacement, so the subsample is an unbiased sample of all values
  (exactly uniform when every batch has the same size; the last, smaller batch is slightly
  over-weighted). `mse` and `percentile` read only this subsample, so memory is
  O(layers x reservoir) whatever `cali_n` is. 65,536 values per group (256 KiB) keep the
  percentile and the |x - Q(x)|^2.4 mean estimates well within the spread between candidates.

What is measured (docs/calibration.md): MoDiff (`modulate=True`) quantizes the residual of a
layer's input between consecutive steps, so the collector records `x_k - x_{k-1}` at the chosen
steps k >= 1, plus the raw first-step input for a quantized warm-up scale. Plain Q-Diffusion
records the raw input at the chosen steps. Inputs are read by forward pre-hooks on the float
model's Conv/Linear modules, by module path; only the previous step's input of one batch is held.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from modiff_trt.quant.layer import channel_groups
from modiff_trt.quant.model import quantizable_layers
from modiff_trt.sampling.conditioning import ContextSource
from modiff_trt.sampling.run import sample_batches
from modiff_trt.sampling.sampler import Sampler

log = logging.getLogger(__name__)
DEFAULT_RESERVOIR = 1 << 16


@dataclass
class StreamStats:
    """Exact absmax and a bounded random subsample of the values one channel group saw."""

    per_chunk: int
    absmax: float = 0.0
    count: int = 0
    chunks: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, generator: torch.Generator) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.absmax = max(self.absmax, float(flat.abs().max()))
        self.count += flat.numel()
        index = torch.randint(flat.numel(), (self.per_chunk,), generator=generator)
        self.chunks.append(flat[index.to(flat.device)].cpu())

    def values(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.zeros(0)


@dataclass
class LayerStats:
    """Statistics of one layer: per channel group, the step quantizer's input and the warm-up's;
    `act_by_group` holds the step quantizer's per group of sampling steps (one group by default)."""

    groups: list[slice]
    act_by_group: list[list[StreamStats]]
    warmup: list[StreamStats] | None

    @property
    def act(self) -> list[StreamStats]:
        return self.act_by_group[0]


def calibration_steps(num_steps: int, cali_st: int, modulate: bool) -> list[int]:
    """`cali_st` evenly spaced sampling-step indices (0 = first step, at the highest t).

    MoDiff residuals exist from step 1 on (step 0 is the warm-up), so its range starts at 1.
    """
    first = 1 if modulate else 0
    if num_steps - first < 1:
        raise ValueError(f"{num_steps} sampling step(s) leave no residual to calibrate: MoDiff needs >= 2 steps")
    if cali_st < 1:
        raise ValueError(f"cali_st must be >= 1, got {cali_st}")
    if cali_st >= num_steps - first:
        return list(range(first, num_steps))
    return sorted({int(round(s)) for s in np.linspace(first, num_steps - 1, cali_st)})


def input_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[1] * module.groups


class TrajectoryCollector:
    """Forward pre-hooks that feed `StreamStats` while the float model samples trajectories."""

    def __init__(
        self,
        model: nn.Module,
        steps: Sequence[int],
        modulate: bool,
        n_batches: int,
        splits: dict[str, int],
        reservoir: int,
        seed: int,
        step_group: Callable[[int], int] | None = None,
    ):
        """`step_group(step)` (default: all 0) sorts the calibration steps into groups with their
        own statistics; each group keeps a full `reservoir`."""
        self.model, self.steps, self.modulate = model, set(steps), modulate
        self.step_group = step_group or (lambda step: 0)
        self.generator = torch.Generator().manual_seed(int(seed) + 7919)
        per_group: dict[int, int] = {}
        for step in self.steps:
            per_group[self.step_group(step)] = per_group.get(self.step_group(step), 0) + 1
        act_chunks = [
            max(1, math.ceil(reservoir / (per_group.get(g, 1) * n_batches))) for g in range(max(per_group) + 1)
        ]
        warm_chunk = max(1, math.ceil(reservoir / n_batches))
        self.stats: dict[str, LayerStats] = {}
        for name in quantizable_layers(model):
            groups = channel_groups(input_channels(model.get_submodule(name)), splits.get(name, 0))
            self.stats[name] = LayerStats(
                groups=groups,
                act_by_group=[[StreamStats(chunk) for _ in groups] for chunk in act_chunks],
                warmup=[StreamStats(warm_chunk) for _ in groups] if modulate else None,
            )
        self.step = self.calls = 0
        self.previous: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x, stats, step = args[0], self.stats[name], self.step
            linear = isinstance(module, nn.Linear)  # channels last: [B, C] or [B, tokens, C]
            if self.modulate and step == 0:
                for group, s in zip(stats.groups, stats.warmup, strict=True):
                    s.update(x[..., group] if linear else x[:, group], self.generator)
            if step in self.steps:
                value = x - self.previous.pop(name) if self.modulate else x
                for group, s in zip(stats.groups, stats.act_by_group[self.step_group(step)], strict=True):
                    s.update(value[..., group] if linear else value[:, group], self.generator)
            if self.modulate and step + 1 in self.steps:
                self.previous[name] = x.detach().clone()

        return hook

    def attach(self, model: nn.Module) -> list[Any]:
        """Hook `model` (the collectors' shared model): its layers, and the UNet to count calls."""
        handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.stats]
        return [*handles, model.register_forward_pre_hook(self._count_call)]

    def _count_call(self, module: nn.Module, args: tuple) -> None:
        """Number model calls, not sampler steps: PLMS calls the UNet twice in its first step,
        and a stateful runner counts those calls (the second is already a modulated step)."""
        self.step, self.calls = self.calls, self.calls + 1

    def _new_trajectory(self, *_: object) -> None:
        self.step, self.calls, self.previous = 0, 0, {}


class Collector(Protocol):
    """What `run_collectors` feeds: hooks on a shared model, told when a new trajectory starts."""

    model: nn.Module

    def attach(self, model: nn.Module) -> list[Any]: ...

    def _new_trajectory(self, *_: object) -> None: ...


def run_collectors(
    collectors: Sequence[Collector],
    sampler: Sampler,
    sample_shape: Sequence[int],
    cali_n: int,
    batch_size: int,
    seed: int,
    conditioning: ContextSource | None = None,
    progress: bool = True,
) -> None:
    """Sample the trajectories once and feed every collector (all hooked on the same model).

    Why: raw (plain) and residual (MoDiff) statistics of one model come from the same float
    trajectories, and the trajectories cost far more than the statistics. Each collector keeps
    its own generator and sees the calls in the same order as alone, so its statistics are
    exactly those of a run of its own.
    """
    model = collectors[0].model
    if any(c.model is not model for c in collectors):
        raise ValueError("collectors sampled together must hook the same model")
    handles = []
    for collector in collectors:
        handles += collector.attach(model)
        collector._new_trajectory()

    def new_trajectory(*_: object) -> None:
        for collector in collectors:
            collector._new_trajectory()

    try:
        sample_batches(
            sampler,
            model,
            sample_shape,
            cali_n,
            batch_size,
            seed,
            conditioning,
            on_batch=new_trajectory,
            progress=progress,
            description="calibration trajectories",
        )
    finally:
        for handle in handles:
            handle.remove()
        for collector in collectors:
            collector._new_trajectory()  # drops the inputs a TrajectoryCollector holds between calls
