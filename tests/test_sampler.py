"""The one `Sampler`: factory defaults and overrides, the dict round trip, errors, one StepCallback."""

from __future__ import annotations

import pytest
import torch

from modiff_trt.errors import ArtifactError, ConfigError
from modiff_trt.models import load_config
from modiff_trt.sampling import (
    DDIMSampler,
    LDMDDIMSampler,
    NoiseSchedule,
    PLMSSampler,
    ddim_sample,
    ddim_timesteps,
    make_sampler,
    sampler_from_dict,
)
from modiff_trt.sampling.ldm import sample_plms
from modiff_trt.sampling.schedules import alphas_cumprod


def eps_model(x, t, context=None):
    return torch.tanh(0.3 * x + t.float()[:, None, None, None] / 1000)


def test_factory_gives_each_family_its_paper_sampler():
    ddim = make_sampler(load_config("ddim-cifar10"))
    assert ddim == DDIMSampler(NoiseSchedule("linear", 1e-4, 0.02), 100, skip_type="quad", eta=0.0)
    churches = make_sampler(load_config("ldm-churches"))
    assert isinstance(churches, LDMDDIMSampler) and (churches.steps, churches.eta) == (400, 0.0)
    assert churches.schedule == NoiseSchedule("scaled_linear", 0.0015, 0.0155)  # LDM's 'linear'
    assert len(churches.timesteps()) == churches.model_calls() == 500  # range(0, 1000, 2) + 1, as upstream
    beds = make_sampler(load_config("ldm-bedrooms"))
    assert (beds.name, beds.steps, beds.eta) == ("ldm-ddim", 200, 1.0)
    sd = make_sampler(load_config("sd-v1"))
    assert (sd.name, sd.steps, sd.guidance_scale, sd.guided) == ("plms", 50, 7.5, True)
    assert sd.model_calls() == 51  # the pseudo improved-Euler first step calls the UNet twice


def test_options_override_and_ddim_means_ldm_ddim_for_latent_models():
    sd = load_config("sd-v1")
    chosen = make_sampler(sd, sampler="ddim", steps=25, eta=0.5)
    assert chosen == LDMDDIMSampler(NoiseSchedule("scaled_linear", 0.00085, 0.012), 25, eta=0.5, guidance_scale=7.5)
    assert make_sampler(chosen, sampler="plms") == PLMSSampler(chosen.schedule, 25, guidance_scale=7.5)
    ddim = make_sampler(load_config("digits"), steps=8, skip_type="uniform", eta=1.0)
    assert (ddim.steps, ddim.skip_type, ddim.eta) == (8, "uniform", 1.0)
    assert make_sampler(ddim, steps=4) == DDIMSampler(ddim.schedule, 4, "uniform", 1.0)  # a sampler as the base


@pytest.mark.parametrize(
    "sampler",
    [
        DDIMSampler(NoiseSchedule("linear", 1e-4, 0.02), 20, "uniform", 0.5),
        LDMDDIMSampler(NoiseSchedule("scaled_linear", 0.0015, 0.0195), 200, eta=1.0),
        PLMSSampler(NoiseSchedule("scaled_linear", 0.00085, 0.012), 50, guidance_scale=7.5),
    ],
)
def test_to_dict_round_trips_exactly(sampler):
    data = sampler.to_dict()
    assert data["sampler"] == sampler.name and data["steps"] == sampler.steps
    assert {"beta_schedule", "beta_start", "beta_end", "num_train_timesteps"} <= set(data)
    assert sampler_from_dict(data) == sampler and sampler_from_dict(data).to_dict() == data


def test_bad_options_and_dicts_name_the_problem():
    ddim, churches = load_config("digits"), load_config("ldm-churches")
    with pytest.raises(ConfigError, match="PLMS runs latent-diffusion"):
        make_sampler(ddim, sampler="plms")
    with pytest.raises(ConfigError, match="--guidance-scale does not apply to the ddim sampler"):
        make_sampler(ddim, guidance_scale=3.0)
    with pytest.raises(ConfigError, match="--skip-type does not apply to the ldm-ddim sampler"):
        make_sampler(churches, skip_type="quad")
    with pytest.raises(ConfigError, match="PLMS is deterministic"):
        make_sampler(churches, sampler="plms", eta=1.0)
    with pytest.raises(ConfigError, match="unconditional"):
        make_sampler(churches, guidance_scale=7.5)
    with pytest.raises(ConfigError, match="--steps 0 is invalid: choose 1..1000"):
        make_sampler(ddim, steps=0)
    with pytest.raises(ArtifactError, match='manifest.sampler is "euler", an unknown sampler'):
        sampler_from_dict({"sampler": "euler"}, "manifest")
    with pytest.raises(ArtifactError, match=r"sampler settings\.beta_start is missing"):
        sampler_from_dict({"sampler": "ddim", "steps": 10, "beta_schedule": "linear"})
    with pytest.raises(ArtifactError, match=r"sampler settings\.eta is not a plms sampler setting"):
        sampler_from_dict({**PLMSSampler(NoiseSchedule("linear", 1e-4, 0.02), 10).to_dict(), "eta": 1.0})


@pytest.mark.parametrize("cls", [DDIMSampler, LDMDDIMSampler])
def test_a_short_schedule_refuses_more_steps_than_timesteps_and_runs_up_to_them(cls):
    short = NoiseSchedule("linear", 1e-4, 0.02, num_train_timesteps=5)
    with pytest.raises(ConfigError, match=r"--steps 50 is invalid: choose 1\.\.5"):
        cls(short, 50)
    fits = cls(short, 5 if cls is DDIMSampler else 1)
    assert max(fits.timesteps()) < 5
    assert torch.isfinite(fits.trajectory(eps_model, torch.randn(1, 1, 2, 2))).all()


def test_trajectory_runs_the_arithmetic_kernels_and_one_step_callback():
    """The sampler adds nothing to the arithmetic: same tensors as the kernels, one callback per step."""
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ddim = DDIMSampler(NoiseSchedule("linear", 1e-4, 0.02), 6)
    seen = []
    got = ddim.trajectory(eps_model, noise, callback=lambda step, t, x: seen.append((step, t, x.shape)))
    want = ddim_sample(eps_model, noise, ddim_timesteps(6, "quad"), ddim.schedule.betas().float())
    assert torch.equal(got, want)
    assert seen == [(k, t, noise.shape) for k, t in enumerate(reversed(ddim.timesteps()))]
    plms = PLMSSampler(NoiseSchedule("scaled_linear", 0.00085, 0.012), 5)
    seen.clear()
    got = plms.trajectory(eps_model, noise, callback=lambda step, t, x: seen.append((step, t)))
    assert torch.equal(got, sample_plms(eps_model, noise, alphas_cumprod(plms.schedule.betas()), 5))
    assert seen == list(enumerate(reversed(plms.timesteps())))


def test_eta_noise_and_context_follow_the_image_index():
    """Image i's trajectory depends on (seed, i) only: eta noise and random context alike."""
    from modiff_trt.sampling.conditioning import RandomContext

    def model(x, t, context=None):
        return torch.tanh(0.3 * x + (0 if context is None else context.mean(dim=(1, 2))[:, None, None, None]))

    sampler = LDMDDIMSampler(NoiseSchedule("scaled_linear", 0.00085, 0.012), 5, eta=1.0, guidance_scale=3.0)
    context = RandomContext((3, 8), seed=2)
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = sampler.trajectory(model, noise, [0, 1, 2, 3], seed=2, conditioning=context)
    part = sampler.trajectory(model, noise[2:], [2, 3], seed=2, conditioning=context)
    assert torch.allclose(whole[2:], part, atol=1e-6)
    with pytest.raises(ConfigError, match="guidance needs context"):
        sampler.trajectory(model, noise)
    with pytest.raises(ConfigError, match="takes no context"):
        DDIMSampler(NoiseSchedule("linear", 1e-4, 0.02), 5).trajectory(model, noise, conditioning=context)
