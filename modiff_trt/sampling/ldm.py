"""Latent-diffusion sampling: LDM DDIM, PLMS and classifier-free guidance.

Arithmetic follows CompVis ``DDIMSampler`` / ``PLMSSampler`` (written anew here):

* the samplers take LatentDiffusion's ``alphas_cumprod`` (``schedules.alphas_cumprod``: the
  cumulative product in float64, then float32);
* DDIM timesteps are ``range(0, T, T // S) + 1``; when ``T % S != 0`` this yields *more* than S
  steps (400 requested -> 500 run), exactly as upstream (the sampler logs it);
* PLMS starts with one pseudo improved-Euler step (two model calls), then Adams-Bashforth of
  order 2, 3 and 4 over the stored eps history.

The model is any callable ``model(x, t)`` or ``model(x, t, context)`` returning eps. Guidance runs
the unconditional and conditional halves as ONE batched call (uncond first), so a stateful MoDiff
runner keeps a state of 2N samples; samplers call ``model.reset_state()`` once per batch when the
model has it (new noise = new trajectory), never inside a trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from modiff_trt.errors import OptionError
from modiff_trt.sampling.step import StepCallback, check_finite, draw_noise, reset_state


class EpsModel(Protocol):
    """What the samplers call: ``model(x, t[, context]) -> eps`` with ``t`` a long tensor [B]."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *context: torch.Tensor) -> torch.Tensor: ...


def ldm_ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Uniform LDM DDIM timesteps ``range(0, T, T // S) + 1`` (ascending, int64)."""
    if not 0 < num_steps <= num_train_timesteps:
        raise OptionError(f"--steps {num_steps} is invalid: choose 1..{num_train_timesteps} (the model's timesteps)")
    return torch.arange(0, num_train_timesteps, num_train_timesteps // num_steps) + 1


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step coefficients (float32, ascending index like ``timesteps``)."""

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)


def make_ddim_schedule(alphas_cumprod: torch.Tensor, num_steps: int, eta: float = 0.0) -> DDIMSchedule:
    """Select the DDIM alphas; ``alphas_prev`` of the first step is ``alphas_cumprod[0]``."""
    acp = alphas_cumprod.float().cpu()
    ts = ldm_ddim_timesteps(num_steps, len(acp))
    alphas = acp[ts]
    alphas_prev = torch.cat([acp[:1], acp[ts[:-1]]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return DDIMSchedule(ts, alphas, alphas_prev, sigmas)


def ddim_update(
    x: torch.Tensor,
    eps: torch.Tensor,
    sched: DDIMSchedule,
    index: int,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM move from step ``index`` to the previous one; returns (x_prev, pred_x0)."""
    a_t = sched.alphas[index].item()
    a_prev = sched.alphas_prev[index].item()
    sigma = sched.sigmas[index].item()
    pred_x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    rest = 1.0 - a_prev - sigma**2  # < 0 for some eta > 1: NaN, as torch's sqrt gives ddim's sampler
    x_prev = math.sqrt(a_prev) * pred_x0 + (math.sqrt(rest) if rest >= 0 else math.nan) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def guided_eps(
    model: EpsModel,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """eps with classifier-free guidance, one model call on the [uncond; cond] batch.

    Without guidance (no ``uncond`` or scale 1) the model sees the N samples alone; with it,
    2N samples, unconditional half first like upstream, so MoDiff caches are sized 2N.
    """
    if uncond is None or guidance_scale == 1.0:
        return model(x, t) if context is None else model(x, t, context)
    if context is None:
        raise ValueError("classifier-free guidance needs a conditional context")
    if uncond.shape[0] == 1 and context.shape[0] != 1:
        uncond = uncond.expand(context.shape[0], *uncond.shape[1:])
    if uncond.shape != context.shape:
        raise ValueError(f"uncond {tuple(uncond.shape)} and context {tuple(context.shape)} differ")
    x_in = torch.cat([x, x])
    t_in = torch.cat([t, t])
    c_in = torch.cat([uncond, context])
    e_uncond, e_cond = model(x_in, t_in, c_in).chunk(2)
    return e_uncond + guidance_scale * (e_cond - e_uncond)


def _t(step: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ddim(
    model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_steps: int,
    eta: float = 0.0,
    context: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """LDM DDIM sampling from ``x_T``; returns the final latent (pred of x_0 at the last step).

    ``generator`` (one, or one per image) drives the eta > 0 noise so runs are reproducible.
    """
    reset_state(model)
    sched = make_ddim_schedule(alphas_cumprod, num_steps, eta)
    x = x_T
    for i, index in enumerate(reversed(range(len(sched)))):
        eps = guided_eps(model, x, _t(sched.timesteps[index], x), context, uncond, guidance_scale)
        check_finite(eps, i, int(sched.timesteps[index]), eta)
        noise = None
        if sched.sigmas[index] > 0:
            noise = draw_noise(generator, x)
        x, _ = ddim_update(x, eps, sched, index, noise)
        check_finite(x, i, int(sched.timesteps[index]), eta, source="the DDIM update")
        if callback is not None:
            callback(i, int(sched.timesteps[index]), x)
    return x


def plms_combine(eps: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth eps' from the current eps and up to 3 previous ones (newest last)."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_plms(
    model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_steps: int,
    context: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """PLMS (pseudo linear multistep) sampling as in CompVis ``PLMSSampler`` (eta is 0).

    The first step has no eps history, so it takes a provisional DDIM step, evaluates eps at the
    next timestep and uses the mean of both (pseudo improved Euler): ``num_steps + 1`` model
    calls in total.
    """
    reset_state(model)
    sched = make_ddim_schedule(alphas_cumprod, num_steps, eta=0.0)
    order = list(reversed(range(len(sched))))  # indices, noisiest first
    history: list[torch.Tensor] = []
    x = x_T
    for i, index in enumerate(order):
        next_index = order[min(i + 1, len(order) - 1)]
        eps = check_finite(
            guided_eps(model, x, _t(sched.timesteps[index], x), context, uncond, guidance_scale),
            i,
            int(sched.timesteps[index]),
        )
        if not history:
            x_guess, _ = ddim_update(x, eps, sched, index)
            t_next = _t(sched.timesteps[next_index], x)
            eps_next = guided_eps(model, x_guess, t_next, context, uncond, guidance_scale)
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = plms_combine(eps, history)
        x, _ = ddim_update(x, eps_prime, sched, index)
        history.append(eps)
        if len(history) > 3:
            history.pop(0)
        if callback is not None:
            callback(i, int(sched.timesteps[index]), x)
    return x
