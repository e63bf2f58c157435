"""Uniform quantizers with the conventions of Q-Diffusion/MoDiff, ONNX and TensorRT.

Symmetric b-bit: scale = absmax / (2^(b-1) - 1), integers in [-2^(b-1), 2^(b-1) - 1].
Rounding is half-to-even (`torch.round`), which is what ONNX QuantizeLinear and TensorRT do,
and values are divided by the scale (not multiplied by its reciprocal) for the same reason.
"""

from __future__ import annotations

import torch

SCALE_FLOOR = 1e-8


def int_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer grid of a b-bit quantizer: [-2^(b-1), 2^(b-1)-1] or [0, 2^b - 1]."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale that maps `absmax` onto the largest positive integer, floored at 1e-8."""
    return torch.clamp(absmax / (2 ** (bits - 1) - 1), min=SCALE_FLOOR)


def asymmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of Q-Diffusion's affine quantizer over a range that includes 0."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=SCALE_FLOOR)
    return scale, torch.round(-lo / scale)


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as float) of x: clamp(round(x / scale) + zp) on the b-bit grid."""
    lo, hi = int_range(bits, symmetric=zero_point is None)
    q = torch.round(x / scale)
    if zero_point is not None:
        q = q + zero_point
    return torch.clamp(q, lo, hi)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, bits: int, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize: the value a low-bit kernel would see."""
    q = quantize(x, scale, bits, zero_point)
    if zero_point is not None:
        q = q - zero_point
    return q * scale


def per_channel_weight(
    weight: torch.Tensor, bits: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-output-channel (axis 0) integer codes, scales and zero points (None if symmetric).

    Scales and zero points have shape [O, 1, ...] so they broadcast against the weight.
    """
    flat = weight.reshape(weight.shape[0], -1)
    view = (-1,) + (1,) * (weight.dim() - 1)
    if symmetric:
        scale = symmetric_scale(flat.abs().amax(dim=1), bits).view(view)
        return quantize(weight, scale, bits), scale, None
    scale, zero_point = asymmetric_params(flat.amin(dim=1), flat.amax(dim=1), bits)
    scale, zero_point = scale.view(view), zero_point.view(view)
    return quantize(weight, scale, bits, zero_point), scale, zero_point
