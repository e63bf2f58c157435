"""Schedules, per-image noise and the DDIM loop (LDM/PLMS samplers live beside them)."""

from modiff_trt.sampling.ddim import alpha_bar, ddim_sample
from modiff_trt.sampling.noise import image_noise, step_generators
from modiff_trt.sampling.schedules import ddim_timesteps, linear_betas, make_betas, sqrt_linear_betas

__all__ = [
    "alpha_bar",
    "ddim_sample",
    "ddim_timesteps",
    "image_noise",
    "linear_betas",
    "make_betas",
    "sqrt_linear_betas",
    "step_generators",
]
