"""`LDMConfig`: a LatentDiffusion config parsed from the official YAML or a built-in name.

One parser (`parse_ldm_params`) reads `model.params`, whether it comes from a YAML file or from
`ldm_builtins`, and refuses what this project cannot run (concat conditioning,
v-prediction) with the offending file named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modiff_trt.errors import ConfigError
from modiff_trt.models import ldm_builtins
from modiff_trt.models.autoencoder import FirstStageConfig
from modiff_trt.models.openaimodel import UNetConfig
from modiff_trt.validate import positive_int

_SUPPORTED_CONDITIONING = (None, "crossattn")


@dataclass(frozen=True)
class LDMConfig:
    """What sampling needs from a LatentDiffusion config."""

    name: str
    unet: UNetConfig
    first_stage: FirstStageConfig | None
    channels: int
    image_size: int
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    timesteps: int = 1000
    beta_schedule: str = "linear"
    scale_factor: float = 1.0
    scale_by_std: bool = False
    conditioning_key: str | None = None
    # The paper's sampler settings (see docs/latent-diffusion.md); the CLI uses them as defaults.
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent sample."""
        return (self.channels, self.image_size, self.image_size)


def _conditioning_key(params: Mapping[str, Any]) -> str | None:
    """LatentDiffusion's rule: explicit key, else concat_mode (default True) decides, and an
    unconditional cond stage overrides both."""
    key = params.get("conditioning_key")
    if key is None:
        key = "concat" if params.get("concat_mode", True) else "crossattn"
    if params.get("cond_stage_config") == "__is_unconditional__":
        key = None
    return key


def parse_ldm_params(params: Mapping[str, Any], name: str, source: str) -> LDMConfig:
    """Turn ``model.params`` of a LatentDiffusion YAML into an :class:`LDMConfig`."""
    unet_section = params.get("unet_config")
    if not isinstance(unet_section, Mapping) or "params" not in unet_section:
        raise ConfigError(f"{source}: model.params.unet_config.params is missing")
    unet = UNetConfig.from_params(unet_section["params"], source)
    fs_section = params.get("first_stage_config")
    first_stage = FirstStageConfig.from_yaml(fs_section, source) if isinstance(fs_section, Mapping) else None
    key = _conditioning_key(params)
    if key not in _SUPPORTED_CONDITIONING:
        raise ConfigError(f"{source}: conditioning_key {key!r} is not supported (None, crossattn)")
    if key == "crossattn" and unet.context_dim is None:
        raise ConfigError(f"{source}: crossattn conditioning needs a UNet with context_dim")
    parameterization = params.get("parameterization", "eps")
    if parameterization != "eps":
        raise ConfigError(f"{source}: only eps-prediction models are supported ({parameterization})")
    sampling = dict(params.get("_sampling", {}))
    return LDMConfig(
        name=name,
        unet=unet,
        first_stage=first_stage,
        channels=positive_int(source, "model.params.channels", params.get("channels", unet.in_channels)),
        image_size=positive_int(source, "model.params.image_size", params.get("image_size", unet.image_size or 32)),
        linear_start=float(params.get("linear_start", 1e-4)),
        linear_end=float(params.get("linear_end", 2e-2)),
        timesteps=positive_int(source, "model.params.timesteps", params.get("timesteps", 1000)),
        beta_schedule=str(params.get("beta_schedule", "linear")),
        scale_factor=float(params.get("scale_factor", 1.0)),
        scale_by_std=bool(params.get("scale_by_std", False)),
        conditioning_key=key,
        **sampling,
    )


def load_ldm_yaml(path: str | Path) -> LDMConfig:
    """Parse an official latent-diffusion / stable-diffusion YAML file."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    model = doc.get("model") if isinstance(doc, Mapping) else None
    params = model.get("params") if isinstance(model, Mapping) else None
    if not isinstance(params, Mapping):
        raise ConfigError(f"{path}: no model.params section (not a latent-diffusion config?)")
    return parse_ldm_params(params, name=path.stem, source=str(path))


def resolve_ldm_config(config: str | Path | LDMConfig) -> LDMConfig:
    """Accept a built-in name, a YAML path or an already parsed config."""
    if isinstance(config, LDMConfig):
        return config
    if isinstance(config, str) and config in ldm_builtins.LDM_BUILTINS:
        return parse_ldm_params(ldm_builtins.LDM_BUILTINS[config], name=config, source=f"built-in {config}")
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_ldm_yaml(path)
    raise ConfigError(f"{config}: not a built-in LDM config ({', '.join(ldm_builtins.LDM_BUILTINS)}) nor a YAML file")
