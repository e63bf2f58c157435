"""Floating-point activation formats: FP8 E4M3 and NVFP4, and which layers TensorRT runs them on.

FP8 E4M3 (`fp8`): one per-tensor scale s; a value x becomes e4m3(x / s) * s, where e4m3 rounds
to nearest even onto the 1-4-3 grid (max 448, subnormals down to 2^-9) and saturates at +-448.
The scale maps the tensor's absmax onto 448.

NVFP4 (`nvfp4`): blocks of 16 consecutive channels (the GEMM's reduction dim) share a block scale
b, stored in E4M3 relative to an fp32 tensor scale g. Per block: b = e4m3(amax / 6 / g); values
become e2m1(x / (b g)) * (b g), e2m1 rounding to nearest even onto {0, 0.5, 1, 1.5, 2, 3, 4, 6}
and saturating at +-6. g = absmax / (6 * 448) maps the tensor's absmax onto the largest block
scale. Block scales are always computed from the tensor being quantized (dynamic); g is static
(from calibration) or dynamic. A block whose scale rounds to zero quantizes to zero. A channel
count that is not a multiple of 16 leaves a shorter last block (TensorRT refuses those layers; see
`layer_format`).

`int` is the uniform b-bit integer grid of `quantizers.py`. The float formats are symmetric by
construction (no zero point), like everything TensorRT quantizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modiff_trt.quant.quantizers import SCALE_FLOOR

ACT_FORMATS = ("int", "fp8", "nvfp4")
FORMAT_BITS = {"fp8": 8, "nvfp4": 4}  # fixed widths of the float formats
INT_FALLBACK_BITS = 8  # a layer TensorRT cannot run a float format on quantizes to INT8 instead
FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_BLOCK = 16
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: what TensorRT needs to build each float format (docs/formats.md gives the sources)
FORMAT_REQUIREMENTS = {
    "fp8": "TensorRT 10 (strongly typed) on compute capability >= 8.9 (Ada) for GEMMs, >= 9.0 (Hopper) for convs",
    "nvfp4": "TensorRT >= 10.8 on compute capability >= 10.0 (Blackwell)",
}
FP8_MIN_CONV_CHANNELS = 16  # TensorRT has no FP8 kernels for narrower convolutions
FP8_MAX_CONV_KERNEL = 32  # ... nor for filters of more than 32 taps (kernel h * w)


def round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """y rounded to nearest even onto FP8 E4M3, saturating at +-448 (torch's cast does the rounding;
    it would turn out-of-range values into NaN, hence the clamp)."""
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(y.dtype)


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """y rounded to nearest even onto FP4 E2M1, saturating at +-6.

    The E2M1 grid is uniform with step 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6], and ties go to
    the even multiple of the step (= the even mantissa), so round(y / step) * step is exact RNE;
    ONNX graphs compute it with the same ops (Round is half-to-even there too).
    """
    a = y.abs()
    step = (a >= 2).to(y.dtype)  # 0.5 * (1 + [a >= 2]) + [a >= 4], in place: the hot path of NVFP4
    step += 1
    step *= 0.5
    step += a >= 4
    return (torch.round(y / step) * step).clamp(-FP4_MAX, FP4_MAX)


def fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 scale mapping `absmax` onto 448."""
    return torch.clamp(absmax / FP8_MAX, min=SCALE_FLOOR)


def nvfp4_tensor_scale(absmax: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 tensor scale g: the largest block (amax = absmax) gets block scale 448."""
    return torch.clamp(absmax / (FP4_MAX * FP8_MAX), min=SCALE_FLOOR)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return round_e4m3(x / scale) * scale


def nvfp4_block_scales(blocks: torch.Tensor, tensor_scale: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Dequantized block scales b * g of `blocks`, whose 16 elements run along `dim` (kept as size 1);
    b is on the E4M3 grid."""
    amax = blocks.abs().amax(dim=dim, keepdim=True)
    return round_e4m3(amax / FP4_MAX / tensor_scale) * tensor_scale


def fake_quantize_nvfp4(x: torch.Tensor, tensor_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """NVFP4 quantize-dequantize of x with 16-element blocks along `dim` (split in place, no transpose)."""
    dim = dim % x.dim()
    channels = x.shape[dim]
    pad = -channels % NVFP4_BLOCK
    if pad:  # zeros never raise a block's amax, so padding leaves every block scale unchanged
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1 :])], dim=dim)
    blocks = x.unflatten(dim, (-1, NVFP4_BLOCK))
    scale = nvfp4_block_scales(blocks, tensor_scale, dim + 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero scale then zeroes its block below
    q = round_e2m1(blocks / safe) * scale
    return q.flatten(dim, dim + 1).narrow(dim, 0, channels)


def float_scale(fmt: str, absmax: torch.Tensor) -> torch.Tensor:
    """The static or dynamic per-tensor scale of float format `fmt` for a tensor of `absmax`."""
    return fp8_scale(absmax) if fmt == "fp8" else nvfp4_tensor_scale(absmax)


def fake_quantize_float(fmt: str, x: torch.Tensor, scale: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Quantize-dequantize x in float format `fmt`; NVFP4 blocks run along `channel_dim`."""
    if fmt == "fp8":
        return fake_quantize_fp8(x, scale)
    return fake_quantize_nvfp4(x, scale, channel_dim)


@dataclass(frozen=True)
class LayerFormat:
    """The activation format one layer runs in, and why it differs from the requested one."""

    format: str
    bits: int
    note: str | None = None


def conv_fp8_blocker(in_channels: int, out_channels: int, groups: int, kernel: tuple[int, ...]) -> str | None:
    """Why TensorRT has no FP8 kernel for this convolution, or None (docs/formats.md gives the sources).

    Shared by the layer policy and the export lint, which reads the same facts off a Conv node.
    """
    taps = 1
    for k in kernel:
        taps *= int(k)
    if groups != 1:
        return f"grouped conv (groups={groups}): TensorRT has no FP8 grouped/depthwise kernels"
    if min(in_channels, out_channels) < FP8_MIN_CONV_CHANNELS:
        return (
            f"conv with {in_channels} -> {out_channels} channels: TensorRT's FP8 convs need >= {FP8_MIN_CONV_CHANNELS}"
        )
    if taps > FP8_MAX_CONV_KERNEL:
        return f"conv with a {taps}-tap filter: TensorRT's FP8 convs take <= {FP8_MAX_CONV_KERNEL} taps"
    return None


def layer_format(module: nn.Module, act_format: str, act_bits: int | None, everywhere: bool = False) -> LayerFormat:
    """The format layer `module` quantizes its input in, for a config asking `act_format`.

    TensorRT runs NVFP4 activations only through its dynamic block quantization of 2-D/3-D GEMM
    inputs, so NVFP4 goes on Linears whose input features are a multiple of 16, and every other
    layer falls back to FP8; FP8 falls back to INT8 on convolutions TensorRT has no FP8 kernel for.
    `everywhere` puts the requested format on every layer (a reference-only study: not exportable).
    """
    if act_format == "int" or act_bits is None:
        return LayerFormat("int", act_bits or 0)
    if everywhere:
        return LayerFormat(act_format, FORMAT_BITS[act_format])
    note = None
    if act_format == "nvfp4":
        if isinstance(module, nn.Linear) and module.in_features % NVFP4_BLOCK == 0:
            return LayerFormat("nvfp4", 4)
        note = (
            "convolution: TensorRT quantizes NVFP4 activations only on GEMM (Linear) inputs"
            if not isinstance(module, nn.Linear)
            else f"{module.in_features} input features: NVFP4 blocks need a multiple of {NVFP4_BLOCK}"
        )
    if isinstance(module, nn.Linear):
        return LayerFormat("fp8", 8, note)
    weight = module.weight
    blocker = conv_fp8_blocker(weight.shape[1] * module.groups, weight.shape[0], module.groups, tuple(weight.shape[2:]))
    if blocker is None:
        return LayerFormat("fp8", 8, note)
    return LayerFormat("int", INT_FALLBACK_BITS, blocker if note is None else f"{note}; {blocker}")


def grid_bits(layer_format: str, act_format: str, act_bits: int | None) -> int | None:
    """The width of a layer's activation grid as `layer_format` chose it for a config asking
    `act_format` at `act_bits`: a float format's own width, the asked integer bits, or INT8 where
    a float format falls back to integers. Files and manifests record it per layer; this checks them."""
    if not act_bits:
        return act_bits
    if layer_format != "int":
        return FORMAT_BITS[layer_format]
    return act_bits if act_format == "int" else INT_FALLBACK_BITS
