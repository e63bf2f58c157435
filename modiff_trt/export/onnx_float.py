"""The float UNet as an ONNX graph: the canvas the Q/DQ and state passes draw on.

The quantized layers' weights and biases are traced as graph *inputs* named `<layer>.weight` and
`<layer>.bias`, not as initializers: the Q/DQ pass replaces every such layer with its own integer
weights, so the float copies would only be written, read back and thrown away. For Stable
Diffusion that is 3.4 GB held several times over (the exporter's protobuf, the loaded graph,
numpy copies) and an export that did not fit in 24 GB; traced this way the canvas is a few
megabytes of normalisation parameters whatever the model's size. Named inputs also locate each
layer without guessing: a Conv or Gemm reads `<layer>.weight` directly, a Linear on a 3-D tensor
reads it through a Transpose (`sites.py`).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from modiff_trt.errors import ArtifactError
from modiff_trt.export import naming
from modiff_trt.quant.model import shared_copy

log = logging.getLogger(__name__)


class _TracedLayer(nn.Module):
    """Stands in for one Conv1d/Conv2d/Linear during the trace and computes with the weight and
    bias handed to it as traced inputs. The wrapped layer is held outside the module tree, so its
    parameters never become initializers."""

    def __init__(self, layer: nn.Module, name: str):
        super().__init__()
        if isinstance(layer, nn.Conv1d | nn.Conv2d) and layer.padding_mode != "zeros":
            raise ArtifactError(
                f"layer {name}: padding_mode={layer.padding_mode!r} is not exported (only zero padding is)"
            )
        self.__dict__["layer"] = layer  # not a submodule: see the class docstring
        self.__dict__["inputs"] = (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.inputs
        m = self.layer
        if isinstance(m, nn.Linear):
            return F.linear(x, weight, bias)
        conv = F.conv2d if isinstance(m, nn.Conv2d) else F.conv1d
        return conv(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)


class _LayerInputsView(nn.Module):
    """The UNet with `layers` reading their weights (and biases) from extra forward arguments.

    The module tree is a copy that shares every tensor with the original (nothing is duplicated).
    """

    def __init__(self, unet: nn.Module, layers: Sequence[str], has_context: bool):
        super().__init__()
        self.unet = shared_copy(unet)
        self.names, self.has_context = list(layers), has_context
        self.stand_ins: list[_TracedLayer] = []
        for name in layers:
            parent_name, _, child = name.rpartition(".")
            parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
            stand_in = _TracedLayer(getattr(parent, child), name)
            setattr(parent, child, stand_in)
            self.stand_ins.append(stand_in)

    def layer_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(input name, tensor) of every weight and bias, in the order `forward` takes them."""
        out = []
        for stand_in, name in zip(self.stand_ins, self.names):
            out.append((f"{name}.weight", stand_in.layer.weight.detach()))
            if stand_in.layer.bias is not None:
                out.append((f"{name}.bias", stand_in.layer.bias.detach()))
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        context, tensors = (rest[0], rest[1:]) if self.has_context else (None, rest)
        tensors = iter(tensors)
        for stand_in in self.stand_ins:
            weight = next(tensors)
            stand_in.__dict__["inputs"] = (weight, None if stand_in.layer.bias is None else next(tensors))
        return self.unet(x, t) if context is None else self.unet(x, t, context=context)


def export_float_onnx(
    unet: torch.nn.Module,
    sample_shape: Sequence[int],
    opset: int,
    batch_size: int | None,
    context_shape: Sequence[int] | None = None,
    layers: Sequence[str] = (),
) -> onnx.ModelProto:
    """Trace `unet` to ONNX with inputs x, t[, context] and output eps; batch dim dynamic if None.

    `layers` (module paths) get their weights and biases as the extra inputs `<layer>.weight` /
    `<layer>.bias` instead of initializers; with none, the graph is a complete float model.
    """
    example_batch = batch_size or 2
    args: list[torch.Tensor] = [torch.randn(example_batch, *sample_shape), torch.full((example_batch,), 500.0)]
    names = [naming.X, naming.T]
    if context_shape is not None:
        args.append(torch.randn(example_batch, *context_shape))
        names.append(naming.CONTEXT)
    dynamic = None if batch_size else {n: {0: "batch"} for n in names + [naming.EPS]}
    model: nn.Module = unet.eval()
    if layers:
        model = _LayerInputsView(unet.eval(), layers, context_shape is not None)
        for name, tensor in model.layer_tensors():
            names.append(name)
            args.append(tensor)
    # no_grad: the traced weights are the model's parameters, and with autograd on, the trace kept
    # every activation for a backward pass (SD v1's export peaked at 9.0 GB instead of 6.7)
    with tempfile.TemporaryDirectory(prefix="modiff-float-") as tmp, warnings.catch_warnings(), torch.no_grad():
        # Through a file, not memory: a complete fp32 SD graph is over protobuf's 2 GB limit, and the
        # exporter then writes its weights as external data, which onnx.load brings back.
        warnings.simplefilter("ignore")  # tracer warnings about python ints in shapes are expected
        path = Path(tmp) / "float.onnx"
        torch.onnx.export(
            model,
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
