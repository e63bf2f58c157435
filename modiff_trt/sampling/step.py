"""What every sampler loop shares: the step callback, the NaN check, eta noise and the state reset."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modiff_trt.errors import ModiffError, OptionError

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


def check_finite(values: torch.Tensor, step: int, t: int, eta: float = 0.0, source: str = "the UNet") -> torch.Tensor:
    """`values` unchanged, or a clear error naming the likeliest cause of NaN/Inf (every backend, every sampler).

    With eta outside [0, 1] that cause is eta, not the checkpoint: DDIM's deterministic term
    sqrt(1 - alpha_next - sigma^2) turns imaginary once sigma (eta times DDPM's) outgrows it.
    """
    if bool(torch.isfinite(values).all()):
        return values
    where = f"{source} returned NaN/Inf at step {step} (t={t})"
    if not 0.0 <= eta <= 1.0:
        raise OptionError(
            f"{where} with --eta {eta}: an eta outside [0, 1] asks DDIM for more noise than this "
            "schedule holds; choose --eta in [0, 1]"
        )
    raise ModiffError(
        f"{where}: check that the checkpoint matches the config and, for quantized runs, that the "
        "calibration belongs to this checkpoint (or try more bits)"
    )
