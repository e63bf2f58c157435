"""UNet architectures, their configs and the loaders that read official configs and checkpoints."""

from modiff_trt.models.config import ModelConfig
from modiff_trt.models.ddim_config import DDIMModelConfig
from modiff_trt.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff_trt.models.latent import LatentModelConfig
from modiff_trt.models.loading import load_unet
from modiff_trt.models.registry import builtin_names, load_config

__all__ = [
    "DDIMModelConfig",
    "DDIMUNet",
    "DDIMUNetConfig",
    "LatentModelConfig",
    "ModelConfig",
    "builtin_names",
    "load_config",
    "load_unet",
]
