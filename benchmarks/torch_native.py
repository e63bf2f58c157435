"""The seed demo's approach, re-implemented for the speed table: MoDiff in PyTorch eager on
torch.ao's native quantized CPU ops (fbgemm/x86 engine).

Per Conv2d/Linear, every later step: `rq = quantize_per_tensor(x - a_hat)` (quint8, zero point
128: the symmetric int8 grid), `y = torch.ao.nn.quantized.Conv2d/Linear(rq)` with per-channel
qint8 weights and no bias, `o_hat = o_hat + y.dequantize()`, `a_hat = a_hat + rq.dequantize()`.
The quantized op requantizes its output to 8 bits with a fixed output scale, as the seed did;
that is not exact for MoDiff (our ort-cpu target is), but it is the approach being measured.
The first step (warm-up) runs the float layer. Attention matmuls stay float.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao.nn import quantized as nnq

ZERO_POINT = 128


def _quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1).clamp(min=1e-8) / 127
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(weight.detach().float(), scale.double(), zeros, 0, torch.qint8)


class NativeModiffLayer(nn.Module):
    """One Conv2d/Linear with MoDiff state on torch's quantized kernels."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, act_scale: float, out_scale: float):
        super().__init__()
        self.float_layer = layer
        if isinstance(layer, nn.Conv2d):
            self.qlayer = nnq.Conv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
                bias=False,
            )
        else:
            self.qlayer = nnq.Linear(layer.in_features, layer.out_features, bias_=False)
        self.qlayer.set_weight_bias(_quantized_weight(layer.weight), None)
        self.qlayer.scale, self.qlayer.zero_point = float(out_scale), ZERO_POINT
        self.act_scale = float(act_scale)
        self.a_hat: torch.Tensor | None = None
        self.o_hat: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_hat is None:
            self.a_hat, self.o_hat = x, self.float_layer(x)
            return self.o_hat
        rq = torch.quantize_per_tensor(x - self.a_hat, self.act_scale, ZERO_POINT, torch.quint8)
        self.a_hat = self.a_hat + rq.dequantize()
        self.o_hat = self.o_hat + self.qlayer(rq).dequantize()
        return self.o_hat


def native_modiff_unet(model: nn.Module, act_scales: dict[str, float], out_scales: dict[str, float]) -> nn.Module:
    """A copy of `model` whose Conv2d/Linear layers (keys of `act_scales`) run NativeModiffLayer."""
    unet = copy.deepcopy(model).eval()
    for name in act_scales:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, NativeModiffLayer(getattr(parent, child), act_scales[name], out_scales[name]))
    return unet


def reset(unet: nn.Module) -> None:
    """Start a new batch: the next call is a float warm-up."""
    for module in unet.modules():
        if isinstance(module, NativeModiffLayer):
            module.a_hat = module.o_hat = None
