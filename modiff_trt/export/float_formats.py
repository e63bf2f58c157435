"""Graph forms of the float activation formats (FP8 E4M3, NVFP4) for the Q/DQ pass.

FP8 is plain ONNX: QuantizeLinear/DequantizeLinear to FLOAT8E4M3FN (opset >= 19) with a constant
per-tensor scale and an FP8 zero point of 0, which TensorRT builds and ONNX Runtime's CPU kernels
run exactly (saturating, round to nearest even, the same values as `quant.formats.round_e4m3`).

NVFP4 has two forms of the same arithmetic (`quant.formats.fake_quantize_nvfp4`), x of shape
[..., C] with 16-channel blocks along the last dim and a constant fp32 tensor scale g:

- TensorRT (`nvfp4_trt`): its dynamic block quantization, as TensorRT's ONNX parser reads it,

      x_f4, b_f8 = trt::TRT_FP4DynamicQuantize(x, g)   axis=-1, block_size=16, scale_type=FP8
      s  = DequantizeLinear(b_f8, g)                     the block scales b * g (fp32)
      xq = trt::DequantizeLinear(x_f4, s)                axis=-1, block_size=16

  TensorRT accepts it on 2-D/3-D GEMM inputs with a constant g. ONNX Runtime has no FP4 kernels,
  so these graphs are for TensorRT only.
- ONNX Runtime (`nvfp4_emulated`): standard ops on [N, 16] blocks. The block scale goes through
  FP8 Q/DQ with scale g exactly as in TensorRT's double quantization; the E2M1 rounding is
  round(y / step) * step with step 0.5 / 1 / 2 on |y| < 2 / < 4 / else, clipped to +-6, which is
  round-to-nearest-even onto E2M1 (`quant.formats.round_e2m1` computes the same ops). A block whose
  scale is 0 divides by 1 instead and is multiplied by its zero scale.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from modiff_trt.quant.formats import FP4_MAX, NVFP4_BLOCK

TRT_DOMAIN = "trt"
TRT_FP4_QUANTIZE = "TRT_FP4DynamicQuantize"


def fp8_zero_point(em) -> str:
    """An FP8 E4M3 zero point of 0 (numpy has no fp8 dtype, so the tensor is built directly)."""
    name = em.fresh("zero_point_fp8")
    em.initializers.append(helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    return name


def fp8_fake_quant(em, x: str, scale: float) -> str:
    """DQ(Q(x)) through FLOAT8E4M3FN with a constant scale."""
    s, zp = em.float_const("scale", scale), fp8_zero_point(em)
    return em.op("DequantizeLinear", [em.op("QuantizeLinear", [x, s, zp]), s, zp])


def nvfp4_trt(em, x: str, tensor_scale: float) -> str:
    """TensorRT's NVFP4 dynamic block quantization of x (channels last); the result is in the graph's float type."""
    g = em.const("nvfp4_tensor_scale", np.array(tensor_scale, dtype=np.float32))
    x_f4, b_f8 = em.fresh("x_fp4"), em.fresh("block_scale_fp8")
    em.nodes.append(
        helper.make_node(
            TRT_FP4_QUANTIZE,
            [x, g],
            [x_f4, b_f8],
            name=em.fresh(TRT_FP4_QUANTIZE),
            domain=TRT_DOMAIN,
            axis=-1,
            block_size=NVFP4_BLOCK,
            scale_type=TensorProto.FLOAT8E4M3FN,
        )
    )
    block_scale = em.op("DequantizeLinear", [b_f8, g, fp8_zero_point(em)])
    xq = em.fresh("x_nvfp4")
    em.nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [x_f4, block_scale],
            [xq],
            name=em.fresh("DequantizeLinear"),
            domain=TRT_DOMAIN,
            axis=-1,
            block_size=NVFP4_BLOCK,
        )
    )
    if em.float_dtype != np.float32:  # the DQs return fp32, the scale's type; fp16 graphs cast back
        xq = em.op("Cast", [xq], to=helper.np_dtype_to_tensor_dtype(em.float_dtype))
    return xq


def nvfp4_emulated(em, x: str, tensor_scale: float) -> str:
    """The same NVFP4 arithmetic with standard ONNX ops (x's last dim a multiple of 16)."""
    blocks = em.op("Reshape", [x, em.const("block_shape", np.array([-1, NVFP4_BLOCK], dtype=np.int64))])
    amax = em.op("ReduceMax", [em.op("Abs", [blocks]), em.const("axes", np.array([-1], dtype=np.int64))], keepdims=1)
    g, zp = em.float_const("nvfp4_tensor_scale", tensor_scale), fp8_zero_point(em)
    block_fp8 = em.op("QuantizeLinear", [em.op("Div", [amax, em.float_const("fp4_max", FP4_MAX)]), g, zp])
    scale = em.op("DequantizeLinear", [block_fp8, g, zp])
    live = em.op("Greater", [scale, em.float_const("zero", 0.0)])
    y = em.op("Div", [blocks, em.op("Where", [live, scale, em.float_const("one", 1.0)])])
    a = em.op("Abs", [y])
    step = em.op(
        "Where",
        [
            em.op("Less", [a, em.float_const("two", 2.0)]),
            em.float_const("half", 0.5),
            em.op(
                "Where",
                [
                    em.op("Less", [a, em.float_const("four", 4.0)]),
                    em.float_const("one", 1.0),
                    em.float_const("two", 2.0),
                ],
            ),
        ],
    )
    q = em.op("Mul", [em.op("Round", [em.op("Div", [y, step])]), step])
    q = em.op("Clip", [q, em.float_const("lo", -FP4_MAX), em.float_const("hi", FP4_MAX)])
    return em.op("Reshape", [em.op("Mul", [q, scale]), em.op("Shape", [x])])
