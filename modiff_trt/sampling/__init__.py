"""Samplers (DDIM, LDM DDIM, PLMS) behind one `Sampler`, schedules, per-image noise, batching."""

from modiff_trt.sampling.ddim import alpha_bar, ddim_sample
from modiff_trt.sampling.noise import image_noise, step_generators
from modiff_trt.sampling.sampler import (
    DDIMSampler,
    LDMDDIMSampler,
    NoiseSchedule,
    PLMSSampler,
    Sampler,
    make_sampler,
    sampler_from_dict,
)
from modiff_trt.sampling.schedules import alphas_cumprod, ddim_timesteps, make_betas
from modiff_trt.sampling.step import StepCallback

__all__ = [
    "DDIMSampler",
    "LDMDDIMSampler",
    "NoiseSchedule",
    "PLMSSampler",
    "Sampler",
    "StepCallback",
    "alpha_bar",
    "alphas_cumprod",
    "ddim_sample",
    "ddim_timesteps",
    "image_noise",
    "make_betas",
    "make_sampler",
    "sampler_from_dict",
    "step_generators",
]
