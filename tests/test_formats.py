"""FP8 E4M3 and NVFP4 activation formats: exact grids, rounding ties, block scales, layer policy.

The grids are checked against values built from the bit layouts and against ml_dtypes' own
float8_e4m3fn / float4_e2m1fn casts (an implementation independent of torch's).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from modiff_trt.errors import ConfigError
from modiff_trt.quant import QuantConfig, quantize_unet
from modiff_trt.quant.formats import (
    E2M1_VALUES,
    fake_quantize_fp8,
    fake_quantize_nvfp4,
    fp8_scale,
    layer_format,
    nvfp4_tensor_scale,
    round_e2m1,
    round_e4m3,
)


def e4m3_positive_grid() -> list[float]:
    """Every finite positive E4M3FN value from its bit layout: 7 subnormals m/8 * 2^-6, then
    (1 + m/8) * 2^(e-7) for e = 1..15 (e = 15, m = 7 is NaN). Sorted by code, so a value's index
    parity is its mantissa's last bit."""
    values = [m / 8 * 2.0**-6 for m in range(1, 8)]
    values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return values


def nearest_even(x: np.ndarray, grid: list[float]) -> np.ndarray:
    """Brute-force round to nearest onto [0] + grid, ties to the even index, saturating at the top."""
    g = np.array([0.0] + grid)
    a = np.minimum(np.abs(x), g[-1])
    dist = np.abs(a[:, None] - g[None, :])
    best = dist.min(axis=1, keepdims=True)
    candidates = np.where(dist == best, np.arange(len(g)), 10**6)
    even = np.where(candidates % 2 == 0, candidates, 10**6).min(axis=1)
    index = np.where(even < 10**6, even, candidates.min(axis=1))
    return np.sign(x) * g[index]


def midpoints(grid: list[float]) -> np.ndarray:
    g = np.array([0.0] + grid)
    return (g[1:] + g[:-1]) / 2


def test_e4m3_grid_is_exact_and_ties_go_to_even_mantissa():
    grid = e4m3_positive_grid()
    assert len(grid) == 126 and grid[-1] == 448 and grid[0] == 2.0**-9 and grid[7] == 2.0**-6
    values = torch.tensor(grid, dtype=torch.float32)
    assert torch.equal(round_e4m3(values), values) and torch.equal(round_e4m3(-values), -values)
    ties = midpoints(grid)
    x = np.concatenate([ties, -ties, np.random.default_rng(0).normal(0, 40, 20000), [500.0, -1e6, 1e-7]])
    got = round_e4m3(torch.tensor(x, dtype=torch.float32)).numpy()
    assert np.array_equal(got, nearest_even(x.astype(np.float32), grid).astype(np.float32))
    clamped = np.clip(x, -448, 448).astype(np.float32)
    assert np.array_equal(got, clamped.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    # named ties: 1 + 1/16 lies between 1 (mantissa 000) and 1.125 (001); 1.1875 between 1.125 and 1.25 (010)
    assert round_e4m3(torch.tensor([1.0625, 1.1875, 464.0, 3 * 2.0**-11])).tolist() == [1.0, 1.25, 448.0, 2.0**-9]


def test_e2m1_grid_ties_and_saturation():
    grid = list(E2M1_VALUES[1:])
    assert round_e2m1(torch.tensor(E2M1_VALUES)).tolist() == list(E2M1_VALUES)
    assert round_e2m1(torch.tensor(midpoints(grid).tolist())).tolist() == [0, 1, 1, 2, 2, 4, 4]
    assert round_e2m1(torch.tensor([-0.75, 6.5, 7.0, -100.0])).tolist() == [-1, 6, 6, -6]
    x = np.concatenate([midpoints(grid), -midpoints(grid), np.random.default_rng(1).normal(0, 3, 20000)])
    got = round_e2m1(torch.tensor(x, dtype=torch.float32)).numpy()
    assert np.array_equal(got, nearest_even(x.astype(np.float32), grid).astype(np.float32))
    assert np.array_equal(got, x.astype(np.float32).astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


def test_fp8_per_tensor_scale_maps_absmax_onto_448():
    x = torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    s = fp8_scale(x.abs().amax())
    codes = round_e4m3(x / s)
    assert float(codes.abs().max()) == 448.0
    assert torch.equal(fake_quantize_fp8(x, s), codes * s)
    assert torch.isin(codes.abs(), torch.tensor([0.0] + e4m3_positive_grid())).all()


def test_nvfp4_block_scales_are_e4m3_relative_to_the_tensor_scale():
    x = torch.zeros(1, 48)
    x[0, :16] = torch.linspace(-3.0, 3.0, 16)  # block 0: amax 3, the tensor's absmax
    x[0, 16:32] = torch.linspace(-0.01, 0.007, 16)  # block 1: amax 0.01
    g = nvfp4_tensor_scale(torch.tensor(3.0))  # block 2 stays all zeros
    assert float(g) == pytest.approx(3.0 / (6 * 448))
    q = fake_quantize_nvfp4(x, g, dim=-1)
    top = torch.tensor(448.0) * g  # the largest block gets block scale 448 exactly
    assert torch.equal(q[0, :16], round_e2m1(x[0, :16] / top) * top)
    b1 = round_e4m3(torch.tensor(0.01) / 6 / g)
    assert float(b1) == 1.5  # 0.01 / 6 / g = 1.4933 rounds onto the E4M3 grid
    assert torch.equal(q[0, 16:32], round_e2m1(x[0, 16:32] / (b1 * g)) * (b1 * g))
    assert torch.equal(q[0, 32:], torch.zeros(16))


def test_nvfp4_blocks_run_along_channels_and_a_short_last_block_keeps_its_own_scale():
    g = torch.tensor(1e-3)
    x = torch.randn(2, 20, 3, 3)
    q = fake_quantize_nvfp4(x, g, dim=1)
    y = x.clone()
    y[:, 3] *= 10  # only block 0 (channels 0..15) at each pixel sees the new amax
    qy = fake_quantize_nvfp4(y, g, dim=1)
    assert torch.equal(qy[:, 16:], q[:, 16:]) and not torch.equal(qy[:, :16], q[:, :16])
    tail = x[:, 16:].movedim(1, -1)  # the 4-channel tail block is quantized on its own amax
    assert torch.equal(q[:, 16:], fake_quantize_nvfp4(tail, g, dim=-1).movedim(-1, 1))


def test_layer_policy_follows_tensorrt_support():
    gemm, odd = nn.Linear(32, 64), nn.Linear(40, 64)
    conv, first, grouped, wide = (
        nn.Conv2d(32, 64, 3),
        nn.Conv2d(1, 32, 3),
        nn.Conv2d(32, 32, 3, groups=4),
        nn.Conv2d(32, 32, 7),
    )
    assert layer_format(gemm, "nvfp4", 4).format == "nvfp4"
    assert layer_format(odd, "nvfp4", 4).format == "fp8" and "multiple of 16" in layer_format(odd, "nvfp4", 4).note
    fallback = layer_format(conv, "nvfp4", 4)
    assert (fallback.format, fallback.bits) == ("fp8", 8) and "GEMM" in fallback.note
    assert layer_format(conv, "fp8", 8).format == "fp8" and layer_format(conv, "fp8", 8).note is None
    for module, reason in ((first, "1 -> 32 channels"), (grouped, "groups=4"), (wide, "49-tap")):
        fmt = layer_format(module, "fp8", 8)
        assert (fmt.format, fmt.bits) == ("int", 8) and reason in fmt.note
    assert layer_format(first, "nvfp4", 4, everywhere=True).format == "nvfp4"
    assert layer_format(conv, "int", 4).format == "int" and layer_format(conv, "int", 4).bits == 4


def test_config_ties_float_formats_to_their_width():
    assert QuantConfig(8, 4, act_format="nvfp4").label == "modiff-w8-nvfp4"
    assert QuantConfig(8, 8, act_format="fp8", modulate=False, format_layers="all").label == "qdiff-w8-fp8-all"
    with pytest.raises(ConfigError, match="4-bit format: set act_bits to 4"):
        QuantConfig(8, 8, act_format="nvfp4")
    with pytest.raises(ConfigError, match="act_format='fp4'"):
        QuantConfig(8, 4, act_format="fp4")


def test_dynamic_fp8_and_nvfp4_modiff_track_the_float_model(tiny_model):
    """MoDiff quantizes residuals in the float formats as in int: the state bookkeeping holds and
    both stay close to the float trajectory on the tiny UNet."""
    from modiff_trt.sampling import ddim_sample
    from tests.helpers.export import BETAS, SEQ, trajectory
    from tests.helpers.models import rel_err

    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = trajectory(tiny_model, noise)
    for fmt, bits in (("fp8", 8), ("nvfp4", 4)):
        q = quantize_unet(tiny_model, QuantConfig(8, bits, act_format=fmt, format_layers="all"))
        assert {layer.format.format for layer in q.layers.values()} == {fmt}
        assert rel_err(trajectory(q, noise), ref) < 0.05
        ddim_sample(q, noise, SEQ[:3], BETAS)
        for layer in q.layers.values():
            assert torch.allclose(layer.o_hat, layer.apply_weight(layer.a_hat, bias=True), rtol=1e-4, atol=1e-4)
