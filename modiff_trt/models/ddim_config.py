"""The ermongroup/ddim family: `DDIMModelConfig` and the parser of the official YAML layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modiff_trt.errors import ConfigError
from modiff_trt.models.config import ModelConfig
from modiff_trt.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff_trt.validate import positive_int, positive_ints


@dataclass
class DDIMModelConfig(ModelConfig):
    """A ddim UNet (CIFAR-10, the packaged digits model) with ddim's linear betas."""

    unet: DDIMUNetConfig

    @property
    def family(self) -> str:
        return "ddim"

    def build(self) -> torch.nn.Module:
        return DDIMUNet(self.unet)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.unet.in_channels, self.unet.resolution, self.unet.resolution)

    def sampler_defaults(self) -> dict[str, Any]:
        return {"sampler": "ddim", "steps": 100, "skip_type": "quad", "eta": 0.0}


def parse_ddim_config(raw: dict[str, Any], source: str, sha: str) -> DDIMModelConfig:
    """A mapping in the official ddim layout (`data`, `model`, `diffusion`) -> `DDIMModelConfig`."""
    try:
        model, data, diffusion = raw["model"], raw["data"], raw["diffusion"]
        unet = DDIMUNetConfig(
            ch=positive_int(source, "model.ch", model["ch"]),
            out_ch=positive_int(source, "model.out_ch", model["out_ch"]),
            ch_mult=positive_ints(source, "model.ch_mult", model["ch_mult"]),
            num_res_blocks=positive_int(source, "model.num_res_blocks", model["num_res_blocks"]),
            attn_resolutions=positive_ints(source, "model.attn_resolutions", model["attn_resolutions"]),
            dropout=float(model.get("dropout", 0.0)),
            in_channels=positive_int(source, "model.in_channels", model["in_channels"]),
            resolution=positive_int(source, "data.image_size", data["image_size"]),
            resamp_with_conv=bool(model.get("resamp_with_conv", True)),
            model_type=str(model.get("type", "simple")),
        )
        schedule = str(diffusion["beta_schedule"])
        if schedule != "linear":
            raise ConfigError(f"{source}: beta_schedule {schedule!r} is not supported; modiff-trt reads 'linear'")
        beta_start, beta_end = float(diffusion["beta_start"]), float(diffusion["beta_end"])
        if not 0 < beta_start < beta_end < 1:
            raise ConfigError(
                f"{source}: diffusion.beta_start {beta_start} and beta_end {beta_end} must satisfy "
                "0 < beta_start < beta_end < 1"
            )
        return DDIMModelConfig(
            unet=unet,
            beta_schedule=schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            num_train_timesteps=positive_int(
                source, "diffusion.num_diffusion_timesteps", diffusion["num_diffusion_timesteps"]
            ),
            source=source,
            sha256=sha,
            raw=raw,
        )
    except KeyError as exc:
        raise ConfigError(
            f"{source} lacks the field {exc.args[0]!r}: expected the official ddim layout "
            "(data.image_size, model.ch, model.ch_mult, ..., diffusion.beta_start)"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source} has an invalid value: {exc}") from exc
