"""Timesteps, betas and the DDIM loop against the official formulas, and per-image noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modiff_trt.sampling import DDIMSampler, NoiseSchedule, ddim_sample, ddim_timesteps, image_noise, make_betas
from modiff_trt.sampling.run import sample_batches
from tests.helpers.models import rel_err


def test_uniform_and_quad_timesteps_match_ddim_runner():
    assert ddim_timesteps(10, "uniform") == list(range(0, 1000, 100))
    quad = ddim_timesteps(100, "quad")
    assert len(quad) == 100 and len(set(quad)) == 96
    assert quad[:4] == [0, 0, 0, 0] and quad[-1] == int(np.linspace(0, np.sqrt(800), 100)[-1] ** 2) == 800
    assert ddim_timesteps(20, "quad")[10] == int((10 * math.sqrt(800) / 19) ** 2)
    with pytest.raises(ValueError, match="--skip-type"):
        ddim_timesteps(10, "cosine")


def test_betas():
    b = make_betas("linear", 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert torch.equal(b.float(), torch.from_numpy(np.linspace(1e-4, 0.02, 1000)).float())  # ddim's Diffusion
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    s = make_betas("scaled_linear", 0.0015, 0.0155)
    assert s[0].item() == pytest.approx(0.0015) and s[-1].item() == pytest.approx(0.0155)
    lo, hi = 0.0015**0.5, 0.0155**0.5
    assert s[500].item() == pytest.approx((lo + 500 / 999 * (hi - lo)) ** 2, rel=1e-6)  # linear in sqrt(beta)
    with pytest.raises(ValueError, match="linear, scaled_linear"):
        make_betas("sqrt_linear", 0.0015, 0.0155)


class Recorder(torch.nn.Module):
    """A deterministic fake eps-model that records the calls the loop makes."""

    def __init__(self):
        super().__init__()
        self.calls, self.resets = [], 0

    def reset_state(self):
        self.resets += 1

    def forward(self, x, t):
        self.calls.append(t.clone())
        return torch.tanh(x * 0.7 + t[:, None, None, None] / 1000)


def official_generalized_steps(x, seq, model, betas, eta, zs):
    """ermongroup/ddim `generalized_steps`, written out in float64 numpy for comparison."""
    b = np.concatenate([[0.0], betas.double().numpy()])
    alphas = np.cumprod(1 - b)
    seq_next = [-1] + list(seq[:-1])
    x = x.double()
    for k, (i, j) in enumerate(zip(reversed(seq), reversed(seq_next), strict=True)):
        at, an = alphas[i + 1], alphas[j + 1]
        e = model(x.float(), torch.full((x.shape[0],), float(i))).double()
        x0 = (x - e * math.sqrt(1 - at)) / math.sqrt(at)
        c1 = eta * math.sqrt((1 - at / an) * (1 - an) / (1 - at))
        c2 = math.sqrt(1 - an - c1**2)
        x = math.sqrt(an) * x0 + c1 * zs[k] + c2 * e
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_loop_matches_generalized_steps(eta):
    betas, seq = make_betas("linear", 1e-4, 0.02).float(), ddim_timesteps(20, "quad")
    noise = torch.randn(3, 2, 4, 4)
    gen = torch.Generator().manual_seed(5)
    zs = [torch.randn(noise.shape, generator=gen).double() for _ in seq]
    model = Recorder()
    got = ddim_sample(model, noise, seq, betas, eta=eta, generator=torch.Generator().manual_seed(5))
    want = official_generalized_steps(noise, seq, Recorder(), betas, eta, zs)
    assert rel_err(got, want) < 1e-5
    assert model.resets == 1 and [int(c[0]) for c in model.calls] == list(reversed(seq))


def test_image_noise_depends_only_on_seed_and_index():
    a = image_noise(7, [0, 1, 2, 3], (1, 4, 4))
    b = image_noise(7, [2, 3], (1, 4, 4))
    assert torch.equal(a[2:], b)
    assert not torch.equal(image_noise(8, [2], (1, 4, 4))[0], b[0])


def test_sample_batches_same_at_any_batch_size():
    model = Recorder()
    sampler = DDIMSampler(NoiseSchedule("linear", 1e-4, 0.02), 5, skip_type="uniform", eta=1.0)
    one = sample_batches(sampler, model, (1, 4, 4), 5, 5, seed=3, progress=False)
    many = sample_batches(sampler, model, (1, 4, 4), 5, 2, seed=3, progress=False)
    assert torch.allclose(one, many, atol=1e-6)
    assert model.resets == 1 + 3  # state reset once per batch, never inside a trajectory


def test_nan_from_the_model_stops_sampling_with_a_clear_error():
    from modiff_trt.errors import ModiffError

    def broken(x, t):
        return torch.where(t[:, None, None, None] < 500, torch.full_like(x, float("nan")), x)

    with pytest.raises(ModiffError, match=r"NaN/Inf at step \d+ \(t=\d+\)"):
        ddim_sample(
            broken, torch.randn(1, 1, 2, 2), ddim_timesteps(10, "uniform"), make_betas("linear", 1e-4, 0.02).float()
        )


@pytest.mark.parametrize("sampler", ["ddim", "ldm-ddim"])
def test_nan_from_an_eta_above_1_names_eta_not_the_checkpoint(sampler):
    from modiff_trt.errors import OptionError
    from modiff_trt.sampling.sampler import LDMDDIMSampler

    schedule = NoiseSchedule("linear", 1e-4, 0.02)
    chosen = {"ddim": DDIMSampler(schedule, 5, eta=3.0), "ldm-ddim": LDMDDIMSampler(schedule, 5, eta=3.0)}[sampler]
    with pytest.raises(OptionError, match=r"step 0 \(t=\d+\) with --eta 3.0: .* choose --eta in \[0, 1\]"):
        chosen.trajectory(lambda x, t: torch.zeros_like(x), torch.randn(2, 1, 2, 2))
