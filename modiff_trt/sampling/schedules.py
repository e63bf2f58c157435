"""Beta schedules and timestep selections, bit-for-bit as the official runners build them.

One name per schedule, whatever a config file calls it:

- `linear`: beta linear in t (ddim's `linear`, LatentDiffusion's `sqrt_linear`);
- `scaled_linear`: sqrt(beta) linear in t (LatentDiffusion's `linear`; diffusers' name too).

Model configs translate their file's names into these when they are parsed.
"""

from __future__ import annotations

import numpy as np
import torch

from modiff_trt.errors import OptionError

BETA_SCHEDULES = ("linear", "scaled_linear")
#: The diffusers schedulers `--scheduler` names, by their class in diffusers.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpm-solver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def scheduler_name(class_name: str | None) -> str | None:
    """`--scheduler`'s name of a diffusers scheduler class (None when it is none of them)."""
    return {cls: name for name, cls in SCHEDULER_CLASSES.items()}.get(class_name or "")


def make_betas(schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Betas in float64; the DDIM sampler casts them to float32 first (ddim's `Diffusion.__init__`),
    the LDM samplers take the cumulative product in float64 (LatentDiffusion's buffers)."""
    if schedule == "linear":
        return torch.from_numpy(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r}: use one of {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """`prod(1 - beta)` in the precision of `betas` (float64 for LDMs), returned as float32."""
    return torch.cumprod(1.0 - betas, dim=0).float()


def ddim_timesteps(num_steps: int, skip_type: str = "uniform", num_train_timesteps: int = 1000) -> list[int]:
    """The increasing timestep sequence of ddim's runner (`uniform`: stride, `quad`: squares).

    `quad` may repeat a timestep at small step counts (100 steps give 96 unique values); the
    official runner keeps the repeats, and so do we, so trajectories stay comparable.
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise OptionError(
            f"--steps {num_steps} is invalid: choose 1..{num_train_timesteps} (the model's num_diffusion_timesteps)"
        )
    if skip_type == "uniform":
        return list(range(0, num_train_timesteps, num_train_timesteps // num_steps))
    if skip_type == "quad":
        seq = np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2
        return [int(s) for s in seq]
    raise OptionError(f"--skip-type {skip_type!r} is unknown: use 'uniform' or 'quad'")
