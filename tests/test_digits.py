"""The built-in digits model and the digits metrics (fast: a few seconds on one CPU core)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modiff_trt.metrics import (
    FEATURE_DIM,
    digits_confidence,
    digits_features,
    digits_fid,
    frechet_distance,
    psnr_db,
    real_statistics,
)
from modiff_trt.models import load_unet
from modiff_trt.models.builtin import builtin_checkpoint, builtin_record
from modiff_trt.sampling import ddim_sample, ddim_timesteps, image_noise, make_betas


@pytest.fixture(scope="module")
def real_digits() -> torch.Tensor:
    pytest.importorskip("sklearn")
    from modiff_trt.training.digits import load_digits_images

    return load_digits_images()


@pytest.fixture(scope="module")
def fp_samples() -> torch.Tensor:
    """64 samples of the shipped model, 20 quad DDIM steps, fixed per-image noise.

    One thread: on a shared 2-core machine a 2-thread run of these tiny convs stalls at every
    barrier while another process holds a core (0.3 s alone vs 14-30 s measured under load).
    """
    model = load_unet("digits", builtin_checkpoint("digits"))
    noise = image_noise(0, range(64), (1, 8, 8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ddim_sample(model, noise, ddim_timesteps(20, "quad"), make_betas("linear", 1e-4, 0.02).float())
    finally:
        torch.set_num_threads(threads)


def test_packaged_weights_load_and_match_their_record() -> None:
    path = builtin_checkpoint("digits")
    assert path is not None and path.suffix == ".safetensors"
    assert path.stat().st_size <= 5 * 1024 * 1024
    record = builtin_record("digits")
    assert record is not None
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert record["seed"] == 0 and record["iterations"] >= 1000
    model = load_unet("digits", path)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert builtin_checkpoint("ddim-cifar10") is None


def test_training_is_bitwise_deterministic_for_a_seed(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from modiff_trt.training.digits import train_digits

    a = train_digits(tmp_path / "a.safetensors", iterations=3, seed=5, progress=False)
    b = train_digits(tmp_path / "b.safetensors", iterations=3, seed=5, progress=False)
    c = train_digits(tmp_path / "c.safetensors", iterations=3, seed=6, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    record = json.loads(a.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert record["iterations"] == 3 and math.isfinite(record["final_loss"])
    load_unet("digits", a)  # the trained file fits the built-in config


def test_shipped_real_statistics_have_the_feature_shape() -> None:
    mu, sigma = real_statistics()
    assert mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM)
    assert np.allclose(sigma, sigma.T)
    assert np.linalg.eigvalsh(sigma).min() > -1e-8
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_real_digits_is_far_below_noise(real_digits: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(0)
    real = real_digits[torch.randperm(len(real_digits), generator=generator)[:256]]
    noise = torch.randn(256, 1, 8, 8, generator=generator)
    assert digits_features(real).shape == (256, FEATURE_DIM)
    real_fd, noise_fd = digits_fid(real), digits_fid(noise)
    assert real_fd < 20.0 < 300.0 < noise_fd  # measured: ~10 vs ~616 at N = 256
    confidence, histogram = digits_confidence(real)
    assert confidence > 0.95 and histogram.sum() == 256 and (histogram > 0).all()


def test_psnr() -> None:
    a = torch.rand(4, 1, 8, 8) * 2 - 1
    assert psnr_db(a, a) == math.inf
    assert psnr_db(a, a + 5) == psnr_db(a, torch.ones_like(a))  # both are clamped first
    b = a + 0.01 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert 35.0 < psnr_db(a, b) < math.inf
    assert psnr_db(torch.full((2, 1, 8, 8), -1.0), torch.ones(2, 1, 8, 8)) == pytest.approx(0.0)


def test_fp_model_samples_are_recognisable_digits(fp_samples: torch.Tensor) -> None:
    confidence, histogram = digits_confidence(fp_samples)
    assert confidence > 0.88  # measured 0.948 (64 samples, 20 quad steps); N(0,1) noise gives 0.78
    assert (histogram > 0).sum() >= 8  # not collapsed onto a few classes
    assert digits_fid(fp_samples) < 0.25 * digits_fid(torch.randn(64, 1, 8, 8))


def test_metrics_run_without_scikit_learn_or_scipy() -> None:
    code = (
        "import sys, torch; from modiff_trt.metrics import digits_fid; "
        "digits_fid(torch.zeros(4, 1, 8, 8)); "
        "bad = [m for m in ('sklearn', 'scipy') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
