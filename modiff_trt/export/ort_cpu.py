"""The `ort-cpu` export target: quantized convs and matmuls on ONNX Runtime's integer CPU kernels.

ONNX Runtime runs the TensorRT-style `DQ -> Conv` (float output) as a float convolution on
dequantized values, slower than plain fp32 (docs/cpu-integer.md). Its only integer conv with
an 8-bit output, QLinearConv, requantizes the output, which MoDiff cannot afford: `o_hat` must
accumulate `f(rq, Wq)` exactly, or the error it exists to cancel comes back. So each quantized
channel group becomes

    q   = QuantizeLinear(Clip(x), s, zero_point=uint8 128)         (codes of the same b-bit grid)
    acc = ConvInteger(q, W_u8, 128, 128)   / MatMulInteger          (exact int32 accumulation)
    y   = Cast<float>(acc) * (s * w_scale[c])  (+ bias)
    xq  = DequantizeLinear(q, s, 128)                               (feeds a_hat, as in qdq.py)

`q - 128` equals the int8 code TensorRT's `QuantizeLinear(x, s, 0)` produces (same rounding,
same saturation to [-128, 127]) and `W_u8 - 128` the int8 weight codes, so
`acc = sum(q_int8 * w_int8)` exactly and `y` equals `Op(DQ(q), DQ(W))` up to the float rounding
of one multiply. Unsigned codes: u8 x u8 is the ConvInteger form this target was built and
measured with (docs/cpu-integer.md). Everything else (residual, state Adds, split groups,
float warm-up) is qdq.py's graph form unchanged: this module only swaps the per-group kernel.
"""

from __future__ import annotations

import numpy as np

from modiff_trt.export.qdq import (
    ONNX_TYPE,
    ActGrid,
    Emitter,
    dequantized_op,
    op_attributes,
    quantize_codes,
    weight_codes,
)
from modiff_trt.export.sites import LayerSite
from modiff_trt.quant import QuantLayer

ZERO_POINT = np.array(128, dtype=np.uint8)


def to_uint8(codes: np.ndarray) -> np.ndarray:
    """int8 codes shifted by +128 onto uint8 (zero point 128): same integers, unsigned storage."""
    return (codes.astype(np.int16) + 128).astype(np.uint8)


def integer_kernel(
    em: Emitter,
    site: LayerSite,
    layer: QuantLayer,
    x: str,
    group: int,
    grid: ActGrid,
    bias: np.ndarray | None,
    output: str | None = None,
) -> tuple[str, str]:
    """One channel group on an integer kernel: (dequantized input for a_hat, float output).

    Conv -> ConvInteger with the node's own attributes; Gemm(transB)/MatMul -> MatMulInteger on
    the transposed weight. Both accumulate in int32; one float Mul by `s * w_scale` per output
    channel rescales, so MoDiff's state sees the same values as with DQ -> Op. Float formats have no
    integer kernel: FP8 runs as FP8 Q/DQ into the float op, NVFP4 as its standard-op emulation.
    """
    if grid.format != "int":
        return dequantized_op(em, site, layer, x, group, grid, bias, output, emulate_nvfp4=True)
    q, s, zp = quantize_codes(em, x, grid, ZERO_POINT)
    xq = em.op("DequantizeLinear", [q, s, zp])
    codes, w_scale = weight_codes(layer, group)
    w_zp = em.const("w_zero_point", ZERO_POINT)
    if site.op == "Conv":
        w = em.const("w_uint8", to_uint8(codes))
        acc = em.op("ConvInteger", [q, w, zp, w_zp], **op_attributes(site))
        channel_shape = [1, codes.shape[0]] + [1] * (codes.ndim - 2)
    else:
        w = em.const("w_uint8", to_uint8(codes.T))
        acc = em.op("MatMulInteger", [q, w, zp, w_zp])
        channel_shape = [codes.shape[0]]
    rescale = em.float_const("rescale", (np.float64(grid.scale) * w_scale).reshape(channel_shape))
    acc_float = em.op("Cast", [acc], to=ONNX_TYPE[em.float_dtype])
    if bias is None:
        return xq, em.op("Mul", [acc_float, rescale], output)
    y = em.op("Mul", [acc_float, rescale])
    return xq, em.op("Add", [y, em.float_const("bias", bias.reshape(channel_shape))], output)
