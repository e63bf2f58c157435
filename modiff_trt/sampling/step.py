"""What every sampler loop shares: the step callback, the NaN check, eta noise and the state reset."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modiff_trt.errors import ModiffError

#: `callback(step, t, x)` after every sampler step: step index (0 = noisiest), its timestep,
#: and the sample x after the step. Progress bars, backend comparisons and tests use it.
StepCallback = Callable[[int, int, torch.Tensor], None]


def reset_state(model: Callable[..., torch.Tensor]) -> None:
    """Start a new trajectory: MoDiff state lives for one batch, never across batches."""
    reset = getattr(model, "reset_state", None)
    if callable(reset):
        reset()


def draw_noise(generator: torch.Generator | Sequence[torch.Generator] | None, like: torch.Tensor) -> torch.Tensor:
    """Noise shaped like `like`: from one generator, or one CPU generator per image (batch-size independent)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
    per_image = [torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in generator]
    return torch.stack(per_image).to(like.device)


def check_finite(eps: torch.Tensor, step: int, t: int) -> torch.Tensor:
    """`eps` unchanged, or a clear error if the UNet produced NaN/Inf (every backend, every sampler)."""
    if not bool(torch.isfinite(eps).all()):
        raise ModiffError(
            f"the UNet returned NaN/Inf at step {step} (t={t}): check that the checkpoint matches the config "
            "and, for quantized runs, that the calibration belongs to this checkpoint (or try more bits)"
        )
    return eps
