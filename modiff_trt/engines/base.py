"""The interface every runtime backend offers to the sampling loop.

A backend is a callable UNet that owns the MoDiff state of one batch. The sampling loop calls
`reset_state()` when it draws new noise and then `runner(x, t, context)` once per denoising
step; the first call after a reset runs the warm-up graph (it creates `a_hat`/`o_hat`), every
later call runs the modulated step graph. The loop never sees the state, so the same loop
drives the torch reference, ONNX Runtime and TensorRT.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class UNetRunner(Protocol):
    """A stateful UNet: `eps = runner(x, t, context)` on `runner.device`."""

    name: str
    device: torch.device

    def reset_state(self) -> None:
        """Forget the MoDiff state: the next call is a warm-up step."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise for `x` at timesteps `t` (shape [B], float32)."""
