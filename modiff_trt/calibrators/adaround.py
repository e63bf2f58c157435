"""AdaRound: learn, per weight, whether to round down or up (Nagel et al., 2020).

Rounding to nearest minimises each weight's own error, not the layer's output error: at 4 bits
the errors of a channel add up coherently and the block output drifts (the digits model keeps
17 dB PSNR with nearest 4-bit weights). AdaRound keeps the grid (scale per output channel and
channel group) and learns only the rounding direction, by gradient descent on a continuous
relaxation:

    W_soft = s * clamp(floor(W / s) + h(V), qmin, qmax)
    h(V)   = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1

V starts where h(V) equals the fractional part of W / s, so the first iteration reproduces the
float weight (clamped to the grid). A regulariser `sum(1 - |2 h(V) - 1|^beta)` pushes every h to
0 or 1; its exponent `beta` falls from 20 (only values near 0.5 are pushed) to 2 (everything is)
after a warm-up without it (`BetaSchedule`). At the end the hard rounding is floor + (V >= 0),
which is where h(V) >= 0.5, so the codes are what the relaxation converged to.

The grid is the project's weight grid: symmetric per output channel (and per channel group for
skip-concat layers), integers in [-2^(b-1), 2^(b-1) - 1], so the codes export exactly like
nearest-rounded ones. Block reconstruction (`reconstruct.py`) drives the optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modiff_trt.quant.quantizers import int_range

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class BetaSchedule:
    """The regulariser's exponent over the iterations: none during the first `warmup` fraction,
    then `beta` falls linearly from `start` to `end` (AdaRound's annealing)."""

    start: float = 20.0
    end: float = 2.0
    warmup: float = 0.2

    def beta(self, iteration: int, iterations: int) -> float | None:
        """The exponent at `iteration` of `iterations`; None while the regulariser is off."""
        begin = self.warmup * iterations
        if iteration < begin:
            return None
        progress = (iteration - begin) / max(iterations - begin, 1)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - progress)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V): a sigmoid stretched to [gamma, zeta] and clipped to [0, 1], so 0 and 1 are reachable."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def scale_view(scale: torch.Tensor, groups: list[slice], weight: torch.Tensor) -> torch.Tensor:
    """Per-weight scales: `scale` [O, groups] spread over each group's input channels."""
    view = (-1, 1) + (1,) * (weight.dim() - 2)
    return torch.cat(
        [scale[:, i].reshape(view).expand(-1, g.stop - g.start, *weight.shape[2:]) for i, g in enumerate(groups)],
        dim=1,
    )


class AdaRoundWeight(nn.Module):
    """The learnable rounding of one layer's weight on a fixed symmetric per-channel grid."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, groups: list[slice], bits: int):
        """`weight` is the float weight, `scale` its per-channel (and channel-group) scales [O, groups]."""
        super().__init__()
        self.lo, self.hi = int_range(bits)
        w = weight.detach().float()
        self.register_buffer("step", scale_view(scale.detach().float(), groups, w))
        ratio = w / self.step
        self.register_buffer("floor", torch.floor(ratio))
        self.register_buffer("nearest", torch.round(ratio))
        rest = (ratio - self.floor).clamp(1e-4, 1 - 1e-4)  # sigmoid's inverse is finite inside (0, 1)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft_weight(self) -> torch.Tensor:
        """The relaxed weight the reconstruction loss sees (differentiable in V)."""
        return self.step * torch.clamp(self.floor + rectified_sigmoid(self.v), self.lo, self.hi)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2 h(V) - 1|^beta): 0 when every h is 0 or 1."""
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def codes(self) -> torch.Tensor:
        """The hard rounding: floor + (V >= 0), clamped to the grid."""
        return torch.clamp(self.floor + (self.v >= 0).float(), self.lo, self.hi).detach()

    def nearest_codes(self) -> torch.Tensor:
        """Round to nearest on the same grid: the baseline the reconstruction must beat."""
        return torch.clamp(self.nearest, self.lo, self.hi)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes * self.step

    def flipped(self) -> float:
        """Fraction of weights whose learned rounding differs from round-to-nearest (a diagnostic)."""
        return float((self.codes() != self.nearest_codes()).float().mean())
