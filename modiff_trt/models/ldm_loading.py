"""Loading latent-diffusion / Stable Diffusion UNets and first-stage decoders from checkpoints.

Loaders build the model from an `LDMConfig` and fill it from a checkpoint; any key or shape
disagreement raises :class:`CheckpointError` naming the file, the first differences and the
built-in config that does fit the file, if any (found by building each candidate on the meta
device, which costs no memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from modiff_trt.errors import CheckpointError, ConfigError
from modiff_trt.models import ldm_builtins
from modiff_trt.models.autoencoder import FirstStageDecoder, build_first_stage
from modiff_trt.models.ldm_checkpoint import (
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    StateDict,
    describe_mismatch,
    ema_state,
    expected_shapes,
    is_quantizer_key,
    read_checkpoint_mapping,
    strip_prefix,
    tensors_of,
    to_fp32,
)
from modiff_trt.models.ldm_config import LDMConfig, resolve_ldm_config
from modiff_trt.models.openaimodel import UNetConfig, UNetModel

log = logging.getLogger(__name__)


def build_ldm_unet(cfg: str | Path | LDMConfig | UNetConfig) -> UNetModel:
    """Build the UNet with random weights (eval mode) from any config form."""
    unet_cfg = cfg if isinstance(cfg, UNetConfig) else resolve_ldm_config(cfg).unet
    return UNetModel(unet_cfg).eval()


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
    for name in ldm_builtins.LDM_BUILTINS:
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
        "None of the built-in configs (" + ", ".join(ldm_builtins.LDM_BUILTINS) + ") fits either: pass "
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
        log.warning("%s: config uses scale_by_std but the file has no scale_factor; using %g", path, scale)
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
    config: str | Path | LDMConfig,
    checkpoint: str | Path,
    ema: bool = False,
    trust: bool = False,
    with_first_stage: bool = True,
) -> LoadedLDM:
    """Load the UNet and (when the config has one) the first-stage decoder from one file."""
    cfg = resolve_ldm_config(config)
    path = Path(checkpoint)
    tensors = tensors_of(read_checkpoint_mapping(path, trust=trust), path)
    unet = _load_unet_from(tensors, cfg, path, ema)
    first_stage = None
    if with_first_stage and cfg.first_stage is not None:
        first_stage = _load_first_stage_from(tensors, cfg, path)
    return LoadedLDM(cfg, unet, first_stage)


def load_ldm_unet(
    config: str | Path | LDMConfig,
    checkpoint: str | Path,
    ema: bool = False,
    trust: bool = False,
) -> UNetModel:
    """Load the LDM/SD UNet (fp32, eval) from a Lightning, fp16, Q-Diffusion or bare file.

    ``ema=True`` takes the ``model_ema.*`` copy. ``trust=True`` allows full unpickling for files
    that ``weights_only`` loading refuses; only use it for files you trust.
    """
    return load_ldm(config, checkpoint, ema=ema, trust=trust, with_first_stage=False).unet


def load_first_stage(config: str | Path | LDMConfig, checkpoint: str | Path, trust: bool = False) -> FirstStageDecoder:
    """Load the first-stage decoder from a Lightning checkpoint (``first_stage_model.*``) or a
    standalone autoencoder checkpoint; ``scale_factor`` comes from the file when stored there."""
    cfg = resolve_ldm_config(config)
    path = Path(checkpoint)
    return _load_first_stage_from(tensors_of(read_checkpoint_mapping(path, trust=trust), path), cfg, path)
