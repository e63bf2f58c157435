"""Static quantization parameters handed from a calibration to the quantized model.

Kept apart from the calibrators so the reference model does not depend on how scales were
found (MSE search, a Q-Diffusion checkpoint import, a file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from modiff_trt.errors import ConfigError


@dataclass
class LayerScales:
    """Static parameters of one layer; lists hold one value per channel group (2 when split).

    `act` quantizes what the later steps feed the layer (the residual x - a_hat for MoDiff, the
    raw input for plain Q-Diffusion); `warmup` quantizes the first step's raw input (MoDiff with
    first_step='quantized'). Zero points are None for symmetric quantizers. `weight_codes` are
    integer weights centred on their zero point (W_int - z) and `weight_scale` their per-output
    channel scales [O, groups]: imported rounded weights replace the layer's own rounding.

    `constant_input`: the layer's input never changed between calibration steps (residual absmax
    exactly 0 at every step), like Stable Diffusion's cross-attention `to_k`/`to_v` reading the
    text context. Its residual is then exactly 0, so MoDiff steps pass `o_hat` through: no
    quantizer, no matmul, and no `a_hat` to carry.

    `act_format` is the activation format the scales belong to (`int`, `fp8`, or `nvfp4`, whose
    scale is the fp32 tensor scale).

    `act_absmax`/`warmup_absmax`/`act_groups_absmax` are the absmax each symmetric scale was
    measured from (same shapes); a calibration file keeps them so that a scale no calibration
    could have produced (an edited 1e30) is refused. None where nothing was measured (imported
    Q-Diffusion scales, files older than format version 4, scales made in code).
    """

    act: list[float] | None = None
    act_zero_point: list[float] | None = None
    warmup: list[float] | None = None
    warmup_zero_point: list[float] | None = None
    weight_codes: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    constant_input: bool = False
    act_groups: list[list[float]] | None = None  # residual scales per step group [G][channel groups]; act = [0]
    act_format: str = "int"
    act_absmax: list[float] | None = None
    warmup_absmax: list[float] | None = None
    act_groups_absmax: list[list[float]] | None = None


def scale_ratios(act_groups: Sequence[Sequence[float]]) -> list[tuple[list[float], list[float]]]:
    """(pre, post) float32 multipliers per step group and channel group: s_0/s_g and s_g/s_0.

    A deployed graph keeps ONE constant quantizer scale s_0 (group 0's) and folds step group g
    around it: rq = DQ(Q(r * pre, s_0)) * post. Both the reference and the graphs use these
    float32 numbers, so they compute the same codes; group 0 is exactly 1.0 (the plain quantizer).
    """
    base = np.asarray(act_groups[0], dtype=np.float64)
    out = []
    for scales in act_groups:
        s = np.asarray(scales, dtype=np.float64)
        out.append(((base / s).astype(np.float32).tolist(), (s / base).astype(np.float32).tolist()))
    return out


@dataclass(frozen=True)
class StepGroups:
    """Contiguous groups of sampling steps with their own residual scales, and the schedule they
    were measured on.

    Step k (the k-th model call of a trajectory, 0 = warm-up) belongs to group g when
    bounds[g] <= k < bounds[g + 1]; bounds[0] == 1 and bounds[-1] == len(timesteps). The groups
    are tied to step indices, so the schedule is pinned: `timesteps` in call order (highest t
    first), `steps` and `skip_type` for the messages that tell the user how to sample.
    """

    bounds: tuple[int, ...]
    timesteps: tuple[int, ...]
    skip_type: str

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def even(cls, count: int, timesteps: Sequence[int], skip_type: str) -> StepGroups:
        """`count` contiguous groups of (nearly) equal length over steps 1..S-1 (call order)."""
        steps = len(timesteps)
        if not 1 <= count <= steps - 1:
            raise ConfigError(
                f"--step-groups {count}: a {steps}-step schedule has {steps - 1} modulated steps; choose 1..{steps - 1}"
            )
        bounds = tuple(int(b) for b in np.linspace(1, steps, count + 1).round().astype(int))
        return cls(bounds, tuple(int(t) for t in sorted(timesteps, reverse=True)), skip_type)

    def group_of(self, call: int) -> int:
        """Step group of model call `call` (>= 1)."""
        return int(np.searchsorted(self.bounds, call, side="right")) - 1

    def steps_of(self, group: int) -> range:
        return range(self.bounds[group], self.bounds[group + 1])

    def check_timesteps(self, timesteps: Sequence[int], source: str) -> None:
        """Refuse a sampling schedule other than the pinned one: a group's scales belong to its steps."""
        got = tuple(int(t) for t in sorted(timesteps, reverse=True))
        if got != self.timesteps:
            raise ConfigError(self._refusal(source, f"a {len(got)}-step schedule (t = {_head(got)})"))

    def check_call(self, call: int, source: str) -> None:
        """Refuse a trajectory longer than the pinned schedule (a check that needs no device sync)."""
        if call >= self.steps:
            raise ConfigError(self._refusal(source, f"step {call} (the schedule ends at step {self.steps - 1})"))

    def _refusal(self, source: str, got: str) -> str:
        return (
            f"{source} has {self.count} step groups calibrated for the {self.steps}-step {self.skip_type} "
            f"schedule (t = {_head(self.timesteps)}), but sampling ran {got}: sample with --steps {self.steps} "
            f"--skip-type {self.skip_type}, or recalibrate for this schedule (or with --step-groups 1)"
        )

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "bounds": list(self.bounds),
            "steps": self.steps,
            "skip_type": self.skip_type,
            "timesteps": list(self.timesteps),
        }

    @classmethod
    def from_dict(cls, data: dict) -> StepGroups:
        return cls(tuple(data["bounds"]), tuple(data["timesteps"]), data["skip_type"])


@dataclass
class ScaleSet:
    """Scales for every quantized layer, and what kind of activation they were measured on."""

    modulate: bool  # True: `act` are residual scales (MoDiff); False: raw-activation scales
    layers: dict[str, LayerScales] = field(default_factory=dict)
    source: str = "calibration"
    step_groups: StepGroups | None = None  # None: one residual scale for every step
    act_format: str = "int"  # the --act-format the scales were calibrated for
    weight_method: str | None = None  # what made the layers' integer weights (minmax, mse, adaround, qdiffusion)
    #: the weight bits each layer's integer weights were made at (None: not recorded): codes made
    #: at 4 bits installed on a layer the config gives 8 would make the manifest's bits a lie
    weight_bits: dict[str, int | None] | None = None


def _head(timesteps: Sequence[int]) -> str:
    return ", ".join(map(str, timesteps[:3])) + (", ..." if len(timesteps) > 3 else "")
