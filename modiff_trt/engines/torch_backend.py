"""The `torch` backend: the PyTorch MoDiff reference, built from a config or from a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from modiff_trt.errors import ArtifactError
from modiff_trt.models import load_config, load_unet
from modiff_trt.models.config import ModelConfig
from modiff_trt.quant import QuantConfig, QuantUNet, ScaleSet, quantize_unet


def load_scales(
    calibration: str | Path | None,
    model_cfg: ModelConfig,
    checkpoint: str | Path | None,
    quant: QuantConfig | None = None,
) -> ScaleSet | None:
    """A calibration file's scales, checked against the config, checkpoint and settings they belong to."""
    if calibration is None:
        return None
    from modiff_trt.calibrators import load_calibration

    loaded = load_calibration(calibration)
    if quant is not None:
        loaded.check_settings(quant)
    return loaded.to_scale_set(model_cfg, checkpoint)


class Reference(NamedTuple):
    """What `load_reference` builds: the config, the float UNet and its quantized reference."""

    config: ModelConfig
    float_model: torch.nn.Module
    qmodel: QuantUNet


def load_reference(
    config: str | Path | ModelConfig,
    checkpoint: str | Path | None,
    quant: QuantConfig,
    calibration: str | Path | None = None,
    trust: bool = False,
    ema: bool = False,
) -> Reference:
    """The float UNet and quantized reference of a config + checkpoint (+ calibration, checked
    before the weights load); `ema` picks a latent-diffusion checkpoint's EMA weights."""
    model_cfg = config if isinstance(config, ModelConfig) else load_config(config)
    scales = load_scales(calibration, model_cfg, checkpoint, quant)
    float_model = load_unet(model_cfg, checkpoint, trust=trust, ema=ema)
    return Reference(model_cfg, float_model, quantize_unet(float_model, quant, scales))


def reference_from_manifest(manifest, export_dir: str | Path, trust: bool = False) -> QuantUNet:
    """Rebuild the reference `export_dir` was made from: its checkpoint and config by the paths
    the manifest records, its scales from the export's own calibration (`export_calibration`)."""
    from modiff_trt.export.manifest import export_calibration

    checkpoint = manifest.model.checkpoint
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ArtifactError(
            f"the export's checkpoint {checkpoint} is gone: the torch backend rebuilds the reference from it; "
            "restore the file or use --backend ort"
        )
    calibration = export_calibration(manifest, export_dir)
    return load_reference(
        manifest.model.config, checkpoint, manifest.quant, calibration, trust, ema=manifest.model.ema
    ).qmodel
