"""LDM schedule, DDIM / PLMS samplers and classifier-free guidance batching."""

from __future__ import annotations

import math

import pytest
import torch

from modiff_trt.models.ldm_loading import build_ldm_unet
from modiff_trt.models.openaimodel import UNetConfig
from modiff_trt.sampling.ldm import (
    guided_eps,
    ldm_ddim_timesteps,
    make_ddim_schedule,
    plms_combine,
    sample_ddim,
    sample_plms,
)
from modiff_trt.sampling.schedules import alphas_cumprod, make_betas

ACP = alphas_cumprod(make_betas("scaled_linear", 0.00085, 0.012))


class Recorder:
    """eps model that logs every call and keeps a resettable counter, like a MoDiff runner."""

    def __init__(self, fn=None) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self.resets = 0
        self.fn = fn or (lambda x, t, c: torch.tanh(0.3 * x + t[:, None, None, None] / 1000))

    def reset_state(self) -> None:
        self.resets += 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None):
        self.calls.append((x.shape[0], t.clone(), None if context is None else context.clone()))
        return self.fn(x, t, context)


def test_betas_are_linear_in_sqrt_beta() -> None:
    betas = make_betas("scaled_linear", 0.0015, 0.0155)
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0155)
    mid = (math.sqrt(0.0015) + math.sqrt(0.0155)) / 2
    assert (betas[499].item() + betas[500].item()) / 2 == pytest.approx(mid**2, rel=1e-3)
    assert betas[500].item() < (0.0015 + 0.0155) / 2  # below the plain linear schedule
    assert ACP.dtype == torch.float32 and torch.all(ACP[1:] < ACP[:-1])


def test_ldm_ddim_timesteps_are_shifted_by_one() -> None:
    ts = ldm_ddim_timesteps(50)
    assert ts.tolist() == list(range(1, 1000, 20))
    assert ldm_ddim_timesteps(200).tolist()[-1] == 996
    # upstream quirk kept on purpose: 1000 // 400 == 2, so 500 steps run
    assert len(ldm_ddim_timesteps(400)) == 500
    with pytest.raises(ValueError):
        ldm_ddim_timesteps(0)


def test_ddim_schedule_first_prev_alpha_is_acp0() -> None:
    sched = make_ddim_schedule(ACP, 10, eta=1.0)
    assert sched.alphas_prev[0] == ACP[0] and sched.alphas[0] == ACP[1]
    assert sched.alphas_prev[3] == ACP[sched.timesteps[2]]
    assert torch.all(sched.sigmas > 0)
    assert torch.all(make_ddim_schedule(ACP, 10).sigmas == 0)


def test_cfg_one_batched_call_uncond_first() -> None:
    model = Recorder(lambda x, t, c: x + c.mean(dim=(1, 2))[:, None, None, None])
    x = torch.randn(3, 4, 2, 2)
    t = torch.full((3,), 981)
    cond, uncond = torch.ones(3, 2, 5), torch.zeros(1, 2, 5)  # uncond broadcast from batch 1
    eps = guided_eps(model, x, t, cond, uncond, guidance_scale=7.5)
    assert len(model.calls) == 1
    batch, t_in, c_in = model.calls[0]
    assert batch == 6 and t_in.tolist() == [981] * 6
    assert torch.equal(c_in[:3], torch.zeros(3, 2, 5)) and torch.equal(c_in[3:], cond)
    assert torch.allclose(eps, x + 7.5)  # e_u + s (e_c - e_u) with e_c - e_u = 1
    guided_eps(model, x, t, cond, uncond, guidance_scale=1.0)
    assert model.calls[-1][0] == 3  # no guidance: N samples only


def test_plms_call_count_reset_and_timesteps() -> None:
    model = Recorder()
    x_T = torch.randn(2, 4, 4, 4)
    c, uc = torch.randn(2, 3, 8), torch.zeros(2, 3, 8)
    sample_plms(model, x_T, ACP, 10, context=c, uncond=uc, guidance_scale=5.0)
    assert model.resets == 1
    assert len(model.calls) == 11 and all(b == 4 for b, _, _ in model.calls)
    ts = [call[1][0].item() for call in model.calls]
    # first step evaluates eps at 901 and at the next timestep 801 (pseudo improved Euler)
    assert ts[:3] == [901, 801, 801] and ts[-1] == 1


def test_plms_adams_bashforth_coefficients_extrapolate_linearly() -> None:
    e = [torch.tensor(float(k)) for k in range(4)]
    assert plms_combine(e[1], e[:1]).item() == pytest.approx(1.5)
    assert plms_combine(e[2], e[:2]).item() == pytest.approx(2.5)
    assert plms_combine(e[3], e[:3]).item() == pytest.approx(3.5)


def test_constant_eps_oracle_recovers_scaled_x0() -> None:
    """With eps equal to the true noise, DDIM and PLMS land on sqrt(a0) x0 + sqrt(1-a0) eps."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    a_T = ACP[961].item()  # first of 25 LDM steps is t = 961
    x_T = math.sqrt(a_T) * x0 + math.sqrt(1 - a_T) * noise
    oracle = lambda x, t, c=None: noise  # noqa: E731
    a0 = ACP[0].item()
    expected = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * noise
    assert torch.allclose(sample_ddim(oracle, x_T, ACP, 25), expected, atol=1e-4)
    assert torch.allclose(sample_plms(oracle, x_T, ACP, 25), expected, atol=1e-4)


def test_ddim_eta_noise_is_seeded() -> None:
    model = Recorder()
    x_T = torch.randn(2, 4, 4, 4)
    run = lambda seed: sample_ddim(  # noqa: E731
        model, x_T, ACP, 5, eta=1.0, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    assert model.resets == 4  # once per sampled batch


def test_plms_with_small_sd_unet_is_deterministic_and_sees_2n() -> None:
    cfg = UNetConfig(
        in_channels=4,
        model_channels=32,
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=(1,),
        channel_mult=(1,),
        num_heads=2,
        use_spatial_transformer=True,
        context_dim=8,
        legacy=False,
    )
    torch.manual_seed(0)
    unet = build_ldm_unet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    model = Recorder(lambda x, t, c: unet(x, t, c))
    x_T = torch.randn(1, 4, 8, 8)
    c, uc = torch.randn(1, 3, 8), torch.zeros(1, 3, 8)
    a = sample_plms(model, x_T, ACP, 4, context=c, uncond=uc, guidance_scale=7.5)
    b = sample_plms(model, x_T, ACP, 4, context=c, uncond=uc, guidance_scale=7.5)
    assert a.shape == x_T.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert {batch for batch, _, _ in model.calls} == {2}
    unguided = sample_plms(model, x_T, ACP, 4, context=c)
    assert not torch.allclose(a, unguided)


def test_ldm_ddim_eta_noise_is_per_image_so_batch_size_does_not_matter():
    from modiff_trt.sampling.noise import image_noise, step_generators

    def model(x, t, context=None):
        return torch.tanh(x * 0.5 + t[:, None, None, None] / 1000)

    acp = alphas_cumprod(make_betas("scaled_linear", 0.0015, 0.0155))
    noise = image_noise(3, range(4), (2, 4, 4))
    whole = sample_ddim(model, noise, acp, 10, eta=1.0, generator=step_generators(3, range(4)))
    halves = [
        sample_ddim(model, noise[i : i + 2], acp, 10, eta=1.0, generator=step_generators(3, range(i, i + 2)))
        for i in (0, 2)
    ]
    assert torch.allclose(whole, torch.cat(halves), atol=1e-6)
