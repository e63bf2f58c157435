"""The PyTorch MoDiff reference: quantizers, the stateful quantized layer, the model wrapper."""

from modiff_trt.quant.config import QuantConfig
from modiff_trt.quant.layer import QuantLayer
from modiff_trt.quant.model import QuantUNet, apply_scales, quantizable_layers, quantize_unet
from modiff_trt.quant.scales import LayerScales, ScaleSet

__all__ = [
    "LayerScales",
    "QuantConfig",
    "QuantLayer",
    "QuantUNet",
    "ScaleSet",
    "apply_scales",
    "quantizable_layers",
    "quantize_unet",
]
