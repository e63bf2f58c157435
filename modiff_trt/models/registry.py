"""`load_config`: a built-in name or a YAML path -> the `ModelConfig` of its family.

The registry is the one place that knows every built-in name (the ddim YAMLs packaged in
`modiff_trt/configs/` and the latent-diffusion built-ins of `ldm_builtins`) and how to tell the
two YAML layouts apart, so an unknown name is answered with the whole list.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from modiff_trt.errors import ConfigError
from modiff_trt.models import ldm_builtins
from modiff_trt.models.config import ModelConfig
from modiff_trt.models.ddim_config import parse_ddim_config
from modiff_trt.models.diffusers_unet import diffusers_config
from modiff_trt.models.latent import builtin_latent_config, yaml_latent_config

BUILTIN_DIR = "configs"


def ddim_builtin_names() -> list[str]:
    """The ddim-layout YAMLs that ship in the package (`ddim-cifar10`, `digits`)."""
    folder = resources.files("modiff_trt").joinpath(BUILTIN_DIR)
    return sorted(p.name[: -len(".yml")] for p in folder.iterdir() if p.name.endswith(".yml"))


def builtin_names() -> list[str]:
    """Every name accepted wherever a config path is (`ddim-cifar10`, `digits`, `sd-v1`, ...)."""
    return sorted([*ddim_builtin_names(), *ldm_builtins.LDM_BUILTINS])


def _read_yaml(config: str | Path) -> tuple[dict[str, Any], str, bytes]:
    path = Path(config)
    if path.is_file():
        data = path.read_bytes()
        source = str(path)
    elif str(config) in ddim_builtin_names():
        data = resources.files("modiff_trt").joinpath(BUILTIN_DIR, f"{config}.yml").read_bytes()
        source = str(config)
    else:
        raise ConfigError(
            f"config {str(config)!r} is neither a file nor a built-in name; built-ins: {', '.join(builtin_names())}"
        )
    try:
        parsed = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ConfigError(f"{source} does not hold a YAML mapping: expected the official ddim layout")
    return parsed, source, data


def load_config(config: str | Path) -> ModelConfig:
    """Parse a built-in name or YAML path into the `ModelConfig` of its family.

    ddim YAMLs and built-ins give a `DDIMModelConfig`; latent-diffusion YAMLs (they have
    `model.params.unet_config`) and the built-ins `ldm-churches`, `ldm-bedrooms`, `sd-v1` give a
    `LatentModelConfig` (family 'ldm' or 'sd'); a diffusers UNet or pipeline folder gives a
    `DiffusersModelConfig` (family 'diffusers').
    """
    if isinstance(config, str) and not Path(config).is_file() and config in ldm_builtins.LDM_BUILTINS:
        return builtin_latent_config(config)
    if Path(config).is_dir():
        return diffusers_config(config)
    raw, source, data = _read_yaml(config)
    sha = hashlib.sha256(data).hexdigest()
    if isinstance(raw.get("model"), dict) and "params" in raw["model"]:
        return yaml_latent_config(raw, source, sha)
    return parse_ddim_config(raw, source, sha)
