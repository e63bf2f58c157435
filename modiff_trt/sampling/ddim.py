"""DDIM sampling with the arithmetic of ddim's `generalized_steps`.

The loop knows nothing about quantization or runtimes: it calls `model.reset_state()` once
(MoDiff state lives for one batch, never across batches and never reset inside a trajectory)
and then `model(x, t)` once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modiff_trt.sampling.step import StepCallback, check_finite, draw_noise, reset_state


def alpha_bar(betas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """cumprod(1 - beta) at index t + 1 of [0] + betas, so t = -1 gives 1 (ddim `compute_alpha`)."""
    betas = torch.cat([torch.zeros(1, device=betas.device, dtype=betas.dtype), betas])
    return (1 - betas).cumprod(dim=0).index_select(0, t + 1).view(-1, 1, 1, 1)


@torch.no_grad()
def ddim_sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    timesteps: Sequence[int],
    betas: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run DDIM from `noise` over the increasing `timesteps` and return the final sample.

    `generator` (one, or one per image) feeds the eta noise; `callback(step, t, x)` sees every
    intermediate sample, which is how trajectories are compared across backends.
    """
    pinned = getattr(model, "step_groups", None)
    if pinned is not None:  # scales calibrated per group of steps hold only for their schedule
        pinned.check_timesteps(timesteps, getattr(model, "source", "the model"))
    reset_state(model)
    device = noise.device
    betas = betas.to(device)
    n = noise.shape[0]
    seq = list(timesteps)
    seq_next = [-1] + seq[:-1]
    x = noise
    for step, (i, j) in enumerate(zip(reversed(seq), reversed(seq_next), strict=True)):
        t = torch.full((n,), float(i), device=device)
        a_t = alpha_bar(betas, t.long())
        a_next = alpha_bar(betas, torch.full((n,), j, device=device, dtype=torch.long))
        eps = check_finite(model(x, t), step, i, eta)
        x0 = (x - eps * (1 - a_t).sqrt()) / a_t.sqrt()
        c1 = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
        c2 = ((1 - a_next) - c1**2).sqrt()
        x = a_next.sqrt() * x0
        if eta > 0:  # same order of additions as the official code
            x = x + c1 * draw_noise(generator, x)
        x = check_finite(x + c2 * eps, step, i, eta, source="the DDIM update")
        if callback is not None:
            callback(step, i, x)
    return x
