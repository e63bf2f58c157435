"""The float UNet as an ONNX graph: the canvas the Q/DQ and state passes draw on.

The TorchScript exporter keeps parameter names as initializer names (`down.0.block.0.conv1.
weight`), which is how the passes find each quantized layer's Conv/Gemm/MatMul node without
guessing, and it exports the DDIM UNet in seconds.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

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
    with tempfile.TemporaryDirectory(prefix="modiff-float-") as tmp, warnings.catch_warnings():
        # Through a file, not memory: over protobuf's 2 GB limit (SD in fp32) the exporter writes
        # the weights as external data, which onnx.load brings back into the in-memory graph.
        warnings.simplefilter("ignore")  # tracer warnings about python ints in shapes are expected
        path = Path(tmp) / "float.onnx"
        torch.onnx.export(
            unet.eval(),
            tuple(args),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=[naming.EPS],
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes=dynamic,
        )
        return onnx.load(str(path))
