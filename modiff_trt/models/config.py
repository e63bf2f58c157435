"""Model configs: a built-in name or a YAML in the official ddim layout.

A `ModelConfig` is everything needed to rebuild a UNet and its noise schedule without the
original repository: the architecture fields, the beta schedule and where the config came
from (name or path, and its sha256 for the export manifest).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from modiff_trt.errors import ConfigError
from modiff_trt.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff_trt.sampling.schedules import ddim_timesteps, make_betas

BUILTIN_DIR = "configs"


@dataclass
class ModelConfig:
    """A parsed model config (`family` is 'ddim' here; latent diffusion adds its own)."""

    family: str
    unet: DDIMUNetConfig
    beta_schedule: str
    beta_start: float
    beta_end: float
    num_train_timesteps: int
    source: str
    sha256: str
    raw: dict[str, Any] = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        """The float UNet with freshly initialised weights."""
        return DDIMUNet(self.unet)

    def betas(self) -> torch.Tensor:
        return make_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.unet.in_channels, self.unet.resolution, self.unet.resolution)

    @property
    def context_shape(self) -> tuple[int, ...] | None:
        """Per-sample cross-attention input shape; None: the UNet takes no context."""
        return None

    @property
    def timestep_convention(self) -> str:
        """'ddim' (ermongroup runner) or 'ldm' (`range(0, T, T // S) + 1`): samplers pick by it."""
        return "ddim"

    @property
    def default_steps(self) -> int:
        """Sampling steps used when the user gives none (the paper setting)."""
        return 100

    def timesteps(self, num_steps: int, skip_type: str = "quad") -> list[int]:
        """The increasing timestep sequence this family's sampler runs."""
        return ddim_timesteps(num_steps, skip_type, self.num_train_timesteps)


def builtin_names() -> list[str]:
    """Names accepted wherever a config path is (`ddim-cifar10`, `digits`, ...)."""
    folder = resources.files("modiff_trt").joinpath(BUILTIN_DIR)
    return sorted(p.name[: -len(".yml")] for p in folder.iterdir() if p.name.endswith(".yml"))


def _read_yaml(config: str | Path) -> tuple[dict[str, Any], str, bytes]:
    path = Path(config)
    if path.is_file():
        data = path.read_bytes()
        source = str(path)
    elif str(config) in builtin_names():
        data = resources.files("modiff_trt").joinpath(BUILTIN_DIR, f"{config}.yml").read_bytes()
        source = str(config)
    else:
        raise ConfigError(
            f"config {str(config)!r} is neither a file nor a built-in name; built-ins: "
            f"{', '.join(builtin_names())}"
        )
    try:
        parsed = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ConfigError(f"{source} does not hold a YAML mapping: expected the official ddim layout")
    return parsed, source, data


def _ddim_config(raw: dict[str, Any], source: str, sha: str) -> ModelConfig:
    try:
        model, data, diffusion = raw["model"], raw["data"], raw["diffusion"]
        unet = DDIMUNetConfig(
            ch=int(model["ch"]),
            out_ch=int(model["out_ch"]),
            ch_mult=tuple(int(m) for m in model["ch_mult"]),
            num_res_blocks=int(model["num_res_blocks"]),
            attn_resolutions=tuple(int(r) for r in model["attn_resolutions"]),
            dropout=float(model.get("dropout", 0.0)),
            in_channels=int(model["in_channels"]),
            resolution=int(data["image_size"]),
            resamp_with_conv=bool(model.get("resamp_with_conv", True)),
            model_type=str(model.get("type", "simple")),
        )
        schedule = str(diffusion["beta_schedule"])
        if schedule != "linear":
            raise ConfigError(f"{source}: beta_schedule {schedule!r} is not supported; modiff-trt reads 'linear'")
        return ModelConfig(
            family="ddim",
            unet=unet,
            beta_schedule=schedule,
            beta_start=float(diffusion["beta_start"]),
            beta_end=float(diffusion["beta_end"]),
            num_train_timesteps=int(diffusion["num_diffusion_timesteps"]),
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


def load_config(config: str | Path) -> ModelConfig:
    """Parse a built-in name or YAML path into a `ModelConfig`.

    One entry point for every family: ddim YAMLs/built-ins give family 'ddim'; latent-diffusion
    YAMLs (`model.params.unet_config`) and the built-ins `ldm-churches`, `ldm-bedrooms`, `sd-v1`
    give a `LatentModelConfig` (family 'ldm' or 'sd'), parsed by `ldm_configs`.
    """
    from modiff_trt.models import latent  # imports this module: bind late

    if isinstance(config, str) and not Path(config).is_file() and config in latent.BUILTIN_CONFIGS:
        return latent.builtin_latent_config(config)
    raw, source, data = _read_yaml(config)
    sha = hashlib.sha256(data).hexdigest()
    if isinstance(raw.get("model"), dict) and "params" in raw["model"]:
        return latent.yaml_latent_config(raw, source, sha)
    return _ddim_config(raw, source, sha)
