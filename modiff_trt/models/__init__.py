"""UNet architectures and the loaders that read official configs and checkpoints."""

from modiff_trt.models.config import ModelConfig, builtin_names, load_config
from modiff_trt.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff_trt.models.loading import load_unet

__all__ = ["DDIMUNet", "DDIMUNetConfig", "ModelConfig", "builtin_names", "load_config", "load_unet"]
