"""The float UNet as an ONNX graph: the canvas the Q/DQ and state passes draw on.

The TorchScript exporter keeps parameter names as initializer names (`down.0.block.0.conv1.
weight`), which is how the passes find each quantized layer's Conv/Gemm/MatMul node without
guessing, and it exports the DDIM UNet in seconds.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import onnx
import torch

from modiff_trt.export import naming

log = logging.getLogger(__name__)


def export_float_onnx(
    unet: torch.nn.Module,
    sample_shape: Sequence[int],
    opset: int,
    batch_size: int | None,
    context_shape: Sequence[int] | None = None,
) -> onnx.ModelProto:
    """Trace `unet` to ONNX with inputs x, t[, context] and output eps; batch dim dynamic if None."""
    example_batch = batch_size or 2
    args: list[torch.Tensor] = [torch.randn(example_batch, *sample_shape), torch.full((example_batch,), 500.0)]
    names = [naming.X, naming.T]
    if context_shape is not None:
        args.append(torch.randn(example_batch, *context_shape))
        names.append(naming.CONTEXT)
    dynamic = None if batch_size else {n: {0: "batch"} for n in names + [naming.EPS]}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints in shapes are expected
        torch.onnx.export(
            unet.eval(),
            tuple(args),
            buffer,
            dynamo=False,
            input_names=names,
            output_names=[naming.EPS],
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes=dynamic,
        )
    return onnx.load_from_string(buffer.getvalue())
