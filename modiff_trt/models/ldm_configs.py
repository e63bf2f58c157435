"""Latent-diffusion / Stable Diffusion configs and loaders.

A config comes from the official YAML (``model.params.unet_config`` etc.) or a built-in name
(``ldm-churches``, ``ldm-bedrooms``, ``sd-v1``). The built-ins are written as the same nested
mapping the YAML parses to, so there is exactly one parser and a built-in cannot drift from what
the same file on disk would give.

Loaders build the model from the config and fill it from a checkpoint; any key or shape
disagreement raises :class:`CheckpointError` naming the file, the first differences and the
built-in config that does fit the file, if any (found by building each candidate on the meta
device, which costs no memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from modiff_trt.errors import CheckpointError, ConfigError
from modiff_trt.models.autoencoder import FirstStageConfig, FirstStageDecoder, build_first_stage
from modiff_trt.models.ldm_checkpoint import (
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    StateDict,
    describe_mismatch,
    ema_state,
    expected_shapes,
    is_quantizer_key,
    read_checkpoint,
    strip_prefix,
    tensors_of,
    to_fp32,
)
from modiff_trt.models.openaimodel import UNetConfig, UNetModel

log = logging.getLogger(__name__)

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
    # Paper settings (REFERENCE.md section 3); the CLI uses them as defaults.
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent sample."""
        return (self.channels, self.image_size, self.image_size)


def _kl_f8() -> dict[str, Any]:
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attn_resolutions": [], "dropout": 0.0,
            },
        },
    }


# The relevant part of the official YAMLs: latent-diffusion
# configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml, lsun_bedrooms-ldm-vq-4.yaml and
# stable-diffusion configs/stable-diffusion/v1-inference.yaml.
_BUILTIN_YAML: dict[str, dict[str, Any]] = {
    "ldm-churches": {
        "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "image_size": 32,
        "channels": 4, "concat_mode": False, "scale_by_std": True,
        "cond_stage_config": "__is_unconditional__",
        "unet_config": {"params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
            "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2,
            "channel_mult": [1, 2, 2, 4, 4], "num_heads": 8, "use_scale_shift_norm": True,
            "resblock_updown": True,
        }},
        "first_stage_config": _kl_f8(),
        "_sampling": {"sampler": "ddim", "steps": 400, "eta": 0.0},
    },
    "ldm-bedrooms": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64,
        "channels": 3, "cond_stage_config": "__is_unconditional__",
        "unet_config": {"params": {
            "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2,
            "channel_mult": [1, 2, 3, 4], "num_head_channels": 32,
        }},
        "first_stage_config": {
            "target": "ldm.models.autoencoder.VQModelInterface",
            "params": {
                "embed_dim": 3, "n_embed": 8192,
                "ddconfig": {
                    "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3,
                    "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                    "attn_resolutions": [], "dropout": 0.0,
                },
            },
        },
        "_sampling": {"sampler": "ddim", "steps": 200, "eta": 1.0},
    },
    "sd-v1": {
        "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "image_size": 64,
        "channels": 4, "conditioning_key": "crossattn", "scale_factor": 0.18215,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "unet_config": {"params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
            "legacy": False,
        }},
        "first_stage_config": _kl_f8(),
        "_sampling": {"sampler": "plms", "steps": 50, "eta": 0.0, "guidance_scale": 7.5},
    },
}

BUILTIN_CONFIGS: tuple[str, ...] = tuple(_BUILTIN_YAML)


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
    first_stage = (
        FirstStageConfig.from_yaml(fs_section, source) if isinstance(fs_section, Mapping) else None
    )
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
        channels=int(params.get("channels", unet.in_channels)),
        image_size=int(params.get("image_size", unet.image_size or 32)),
        linear_start=float(params.get("linear_start", 1e-4)),
        linear_end=float(params.get("linear_end", 2e-2)),
        timesteps=int(params.get("timesteps", 1000)),
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


def resolve_ldm_config(config: "str | Path | LDMConfig") -> LDMConfig:
    """Accept a built-in name, a YAML path or an already parsed config."""
    if isinstance(config, LDMConfig):
        return config
    if isinstance(config, str) and config in _BUILTIN_YAML:
        return parse_ldm_params(_BUILTIN_YAML[config], name=config, source=f"built-in {config}")
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_ldm_yaml(path)
    raise ConfigError(
        f"{config}: not a built-in LDM config ({', '.join(BUILTIN_CONFIGS)}) nor a YAML file"
    )


def build_ldm_unet(cfg: "str | Path | LDMConfig | UNetConfig") -> UNetModel:
    """Build the UNet with random weights (eval mode) from any config form."""
    unet_cfg = cfg if isinstance(cfg, UNetConfig) else resolve_ldm_config(cfg).unet
    return UNetModel(unet_cfg).eval()


# ---------------------------------------------------------------------------------------------
# checkpoint loading


def _unet_state(tensors: StateDict, names: list[str], ema: bool, path: Path) -> StateDict:
    """Pick the UNet's tensors out of a Lightning, Q-Diffusion or bare state_dict."""
    if ema:
        return ema_state(tensors, names, path)
    if any(k.startswith(UNET_PREFIX) for k in tensors):
        return strip_prefix(tensors, UNET_PREFIX)
    if any(k.startswith("model.") for k in tensors):  # Q-Diffusion QuantModel wrapper
        state = strip_prefix(tensors, "model.")
    else:
        state = dict(tensors)
    dropped = [k for k in state if is_quantizer_key(k)]
    if dropped:
        log.info("%s: ignoring %d quantizer entries (Q-Diffusion file)", path, len(dropped))
    return {k: v for k, v in state.items() if not is_quantizer_key(k)}


def _suggest_builtin(state: StateDict, part: str) -> str:
    """Name the built-in config(s) whose UNet / first stage has exactly this key/shape set."""
    fits = []
    for name in BUILTIN_CONFIGS:
        cfg = resolve_ldm_config(name)
        with torch.device("meta"):
            if part == "unet":
                module: torch.nn.Module = UNetModel(cfg.unet)
            elif cfg.first_stage is not None:
                module = build_first_stage(cfg.first_stage)
            else:
                continue
        if not describe_mismatch(expected_shapes(module), state):
            fits.append(name)
    if fits:
        return f"The checkpoint fits the built-in config {' / '.join(fits)}: use that instead."
    return (
        "None of the built-in configs (" + ", ".join(BUILTIN_CONFIGS) + ") fits either: pass "
        "the YAML the checkpoint was trained with."
    )


def _fill(module: torch.nn.Module, state: StateDict, path: Path, cfg: LDMConfig, part: str) -> None:
    """Check keys/shapes, then move the checkpoint tensors into a meta-device ``module``.

    Building on the meta device and assigning the loaded tensors skips the random init and the
    second copy of the weights, which matters for the 860M-parameter SD UNet.
    """
    problems = describe_mismatch(expected_shapes(module), state)
    if problems:
        raise CheckpointError(
            f"{path}: {part} weights do not match config {cfg.name!r}:\n  "
            + "\n  ".join(problems)
            + "\n"
            + _suggest_builtin(state, part)
        )
    module.load_state_dict(state, strict=True, assign=True)


def _load_unet_from(tensors: StateDict, cfg: LDMConfig, path: Path, ema: bool) -> UNetModel:
    with torch.device("meta"):
        model = UNetModel(cfg.unet)
    names = [n for n, _ in model.named_parameters()]
    state = _unet_state(tensors, names, ema, path)
    if not state:
        raise CheckpointError(
            f"{path}: no UNet weights found (expected keys {UNET_PREFIX}*, a Q-Diffusion "
            "'model.*' state_dict or a bare UNet state_dict)"
        )
    _fill(model, to_fp32(state), path, cfg, "UNet")
    return model.eval()


def _load_first_stage_from(tensors: StateDict, cfg: LDMConfig, path: Path) -> FirstStageDecoder:
    if cfg.first_stage is None:
        raise ConfigError(f"config {cfg.name!r} has no first_stage_config")
    state = strip_prefix(tensors, FIRST_STAGE_PREFIX) or dict(tensors)
    keep = ("post_quant_conv.", "decoder.", "quantize.embedding.")
    state = {k: v for k, v in state.items() if k.startswith(keep)}
    if not state:
        raise CheckpointError(f"{path}: no first-stage decoder weights ({FIRST_STAGE_PREFIX}*)")
    scale = cfg.scale_factor
    if "scale_factor" in tensors:  # scale_by_std models store the measured factor
        scale = float(tensors["scale_factor"])
    elif cfg.scale_by_std:
        log.warning("%s: config uses scale_by_std but the file has no scale_factor; using %g",
                    path, scale)
    with torch.device("meta"):
        decoder = build_first_stage(cfg.first_stage, scale)
    _fill(decoder, to_fp32(state), path, cfg, "first-stage decoder")
    return decoder.eval()


@dataclass
class LoadedLDM:
    """UNet and decoder read from one checkpoint file (read once: SD files are 4 GB)."""

    config: LDMConfig
    unet: UNetModel
    first_stage: FirstStageDecoder | None


def load_ldm(
    config: "str | Path | LDMConfig",
    checkpoint: str | Path,
    ema: bool = False,
    trust: bool = False,
    with_first_stage: bool = True,
) -> LoadedLDM:
    """Load the UNet and (when the config has one) the first-stage decoder from one file."""
    cfg = resolve_ldm_config(config)
    path = Path(checkpoint)
    tensors = tensors_of(read_checkpoint(path, trust=trust), path)
    unet = _load_unet_from(tensors, cfg, path, ema)
    first_stage = None
    if with_first_stage and cfg.first_stage is not None:
        first_stage = _load_first_stage_from(tensors, cfg, path)
    return LoadedLDM(cfg, unet, first_stage)


def load_ldm_unet(
    config: "str | Path | LDMConfig",
    checkpoint: str | Path,
    ema: bool = False,
    trust: bool = False,
) -> UNetModel:
    """Load the LDM/SD UNet (fp32, eval) from a Lightning, fp16, Q-Diffusion or bare file.

    ``ema=True`` takes the ``model_ema.*`` copy. ``trust=True`` allows full unpickling for files
    that ``weights_only`` loading refuses; only use it for files you trust.
    """
    return load_ldm(config, checkpoint, ema=ema, trust=trust, with_first_stage=False).unet


def load_first_stage(
    config: "str | Path | LDMConfig", checkpoint: str | Path, trust: bool = False
) -> FirstStageDecoder:
    """Load the first-stage decoder from a Lightning checkpoint (``first_stage_model.*``) or a
    standalone autoencoder checkpoint; ``scale_factor`` comes from the file when stored there."""
    cfg = resolve_ldm_config(config)
    path = Path(checkpoint)
    return _load_first_stage_from(tensors_of(read_checkpoint(path, trust=trust), path), cfg, path)
