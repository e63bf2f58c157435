"""Sampling driven by a diffusers scheduler (DDIM, PNDM, DPM-Solver++, Euler), any model family.

The scheduler is diffusers' own object, built on the model's betas (`trained_betas`), so its
arithmetic is the peer's; this loop only feeds it eps from whichever model it is given: the
float UNet, the quantized torch reference or a deployed export. MoDiff's state does not care
which solver asks: it is reset once per batch and then carried across every UNet call the
scheduler makes (PNDM's extra warm-up call and DPM-Solver++'s multistep history included), so
calibration (which runs this same loop) sees exactly the calls that sampling makes.

Fixed choices, for every scheduler: epsilon prediction; no sample clipping (DDIM); PNDM skips
its Runge-Kutta warm-up (`skip_prk_steps`, as Stable Diffusion runs it); DPM-Solver++ is the
multistep `dpmsolver++` of order 2. What a pipeline folder's scheduler config may change is
carried by `SchedulerSampler`: timestep spacing, steps offset and `set_alpha_to_one`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from modiff_trt.errors import BackendUnavailableError, ConfigError
from modiff_trt.sampling.ldm import guided_eps
from modiff_trt.sampling.schedules import SCHEDULER_CLASSES
from modiff_trt.sampling.step import StepCallback, check_finite, reset_state

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def import_diffusers() -> ModuleType:
    """diffusers, or one line naming the extra that installs it."""
    try:
        import diffusers
    except ImportError as exc:
        raise BackendUnavailableError(
            f"diffusers schedulers and model folders need the diffusers package ({exc}): "
            "pip install 'modiff-trt[diffusers]'"
        ) from exc
    return diffusers


def make_scheduler(
    name: str,
    betas: torch.Tensor,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = False,
) -> Any:
    """A fresh diffusers scheduler `name` on `betas` (float64 or float32, one per training step)."""
    if name not in SCHEDULER_CLASSES:
        raise ConfigError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULER_CLASSES)}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ConfigError(f"timestep_spacing {timestep_spacing!r}: choose one of {', '.join(TIMESTEP_SPACINGS)}")
    options: dict[str, Any] = {
        "num_train_timesteps": len(betas),
        "trained_betas": betas.double().cpu().numpy(),
        "timestep_spacing": timestep_spacing,
        "steps_offset": steps_offset,
    }
    if name in ("ddim", "pndm"):
        options["set_alpha_to_one"] = set_alpha_to_one
    options.update(
        {
            "ddim": {"clip_sample": False},
            "pndm": {"skip_prk_steps": True},
            "dpm-solver++": {"algorithm_type": "dpmsolver++"},
        }.get(name, {})
    )
    return getattr(import_diffusers(), SCHEDULER_CLASSES[name])(**options)


def call_timesteps(scheduler: Any, steps: int) -> list[float]:
    """The timestep of every UNet call `scheduler` makes in `steps` steps, in call order (noisiest first)."""
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


@torch.no_grad()
def scheduler_sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    scheduler: Any,
    steps: int,
    *,
    context: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run `scheduler` for `steps` steps from `noise` (unit variance) with eps from `model`; the final sample.

    `callback(call, t, x)` sees x after every scheduler step. Guidance batches [uncond; cond]
    into one model call, as the LDM samplers do.
    """
    timesteps = call_timesteps(scheduler, steps)
    reset_state(model)
    x = noise * scheduler.init_noise_sigma
    for call, t in enumerate(scheduler.timesteps):
        t_model = torch.full((x.shape[0],), float(t), device=x.device)
        model_input = scheduler.scale_model_input(x, t)
        eps = check_finite(guided_eps(model, model_input, t_model, context, uncond, guidance_scale), call, int(t))
        x = check_finite(scheduler.step(eps, t, x, return_dict=False)[0], call, int(t), source="the scheduler step")
        if callback is not None:
            callback(call, int(timesteps[call]), x)
    return x
