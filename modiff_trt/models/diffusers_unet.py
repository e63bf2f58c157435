"""diffusers model folders as a model family: the UNet is built by diffusers itself, not copied.

A diffusers UNet folder holds `config.json` (with `_class_name`) and
`diffusion_pytorch_model.safetensors`; a pipeline folder holds one in `unet/`, beside
`scheduler/scheduler_config.json` (the noise schedule) and, for Stable Diffusion,
`text_encoder/`. `diffusers_config(folder)` reads either into a `DiffusersModelConfig`, whose
`build()` asks diffusers for the architecture and wraps it in `DiffusersUNet`, so the rest of
the project (quantization, calibration, export) sees the `model(x, t[, context]) -> eps` it
knows. `UNet2DModel` (unconditional) and `UNet2DConditionModel` (text cross-attention) are
supported; a UNet that needs more conditioning than that (SDXL's `added_cond_kwargs`, class
labels, `time_cond_proj_dim`) is refused with the reason.

diffusers is an optional extra (`pip install 'modiff-trt[diffusers]'`), imported only when a
folder's UNet is built or a diffusers scheduler runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modiff_trt.errors import ConfigError
from modiff_trt.models.config import ModelConfig
from modiff_trt.sampling.schedulers import import_diffusers
from modiff_trt.sampling.schedules import scheduler_name

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preferred first
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
DEFAULT_TOKENS = 77  # CLIP's context length, when the folder has no text encoder to ask
#: Config entries that make a UNet need inputs beyond (x, t, context): refused, with the reason.
EXTRA_CONDITIONING = {
    "class_embed_type": "class labels",
    "addition_embed_type": "added conditioning (SDXL text_embeds/time_ids)",
    "time_cond_proj_dim": "a guidance embedding (timestep_cond)",
    "num_class_embeds": "class labels",
}


def is_diffusers_folder(path: str | Path) -> bool:
    """A folder holding a diffusers UNet config, directly or in `unet/` (a pipeline folder)."""
    path = Path(path)
    return path.is_dir() and ((path / "config.json").is_file() or (path / "unet" / "config.json").is_file())


class DiffusersUNet(nn.Module):
    """A diffusers UNet behind the project's `model(x, t[, context]) -> eps` call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def end_layers(self) -> tuple[str, str]:
        """The layers that read the latent and write the predicted noise (`QuantConfig.first_last_bits`)."""
        return ("net.conv_in", "net.conv_out")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            return self.net(x, t, return_dict=False)[0]
        return self.net(x, t, encoder_hidden_states=context, return_dict=False)[0]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable {what} JSON ({exc}): re-save the folder with diffusers") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object: not a diffusers {what}")
    return data


@dataclass
class DiffusersModelConfig(ModelConfig):
    """A diffusers `UNet2DModel`/`UNet2DConditionModel` folder, and the schedule beside it when there is one."""

    folder: str
    unet_class: str
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    context_tokens: int = DEFAULT_TOKENS

    @property
    def family(self) -> str:
        return "diffusers"

    def build(self) -> nn.Module:
        diffusers = import_diffusers()
        return DiffusersUNet(getattr(diffusers, self.unet_class).from_config(self.unet_config)).eval()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet_config.get("sample_size")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.unet_config.get("in_channels", 4)), int(height), int(width)

    @property
    def context_shape(self) -> tuple[int, ...] | None:
        if self.unet_class != "UNet2DConditionModel":
            return None
        return self.context_tokens, int(self.unet_config.get("cross_attention_dim", 1280))

    @property
    def weights(self) -> Path:
        """The folder's weights (safetensors, else the .bin state_dict), the checkpoint commands load."""
        candidates = [Path(self.folder) / name for name in WEIGHTS_NAMES]
        return next((path for path in candidates if path.is_file()), candidates[0])

    def sampler_defaults(self) -> dict[str, Any]:
        """The folder's scheduler (DDIM when it names another or none), 50 steps, no guidance."""
        s = self.scheduler_config
        return {
            "sampler": "diffusers",
            "scheduler": scheduler_name(s.get("_class_name")) or "ddim",
            "steps": 50,
            "timestep_spacing": s.get("timestep_spacing", "leading"),
            "steps_offset": int(s.get("steps_offset", 0)),
            "set_alpha_to_one": bool(s.get("set_alpha_to_one", False)),
        }


def _unet_folder(path: Path) -> tuple[Path, Path | None]:
    """(the UNet's folder, the pipeline folder holding it or None)."""
    if (path / "config.json").is_file():
        return path, path.parent if (path.parent / SCHEDULER_CONFIG).is_file() else None
    if (path / "unet" / "config.json").is_file():
        return path / "unet", path
    raise ConfigError(
        f"--config {path}: neither a diffusers UNet folder (config.json) nor a pipeline folder (unet/config.json)"
    )


def _check_unet_config(config: dict[str, Any], source: Path) -> str:
    cls = config.get("_class_name")
    if cls not in UNET_CLASSES:
        raise ConfigError(
            f"--config {source}: _class_name {cls!r} is not a supported diffusers UNet; supported: {', '.join(UNET_CLASSES)}"
        )
    for key, what in EXTRA_CONDITIONING.items():
        if config.get(key) is not None:
            raise ConfigError(
                f"--config {source}: {key} = {config[key]!r} needs {what}, which modiff-trt does not feed"
            )
    return cls


def _context_tokens(pipeline: Path | None) -> int:
    encoder = None if pipeline is None else pipeline / "text_encoder" / "config.json"
    if encoder is None or not encoder.is_file():
        return DEFAULT_TOKENS
    return int(_read_json(encoder, "text encoder config").get("max_position_embeddings", DEFAULT_TOKENS))


def diffusers_config(path: str | Path) -> DiffusersModelConfig:
    """Read a diffusers UNet or pipeline folder (nothing is downloaded, nothing is built yet)."""
    unet_dir, pipeline = _unet_folder(Path(path))
    raw = (unet_dir / "config.json").read_bytes()
    unet_config = _read_json(unet_dir / "config.json", "UNet config")
    unet_class = _check_unet_config(unet_config, unet_dir / "config.json")
    scheduler = {} if pipeline is None else _read_json(pipeline / SCHEDULER_CONFIG, "scheduler config")
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError(
            f"{pipeline / SCHEDULER_CONFIG}: prediction_type {scheduler['prediction_type']!r}; "
            "modiff-trt's samplers take epsilon-predicting UNets only"
        )
    beta_schedule = scheduler.get("beta_schedule", "linear")
    if beta_schedule not in ("linear", "scaled_linear") or scheduler.get("trained_betas") is not None:
        raise ConfigError(
            f"{pipeline / SCHEDULER_CONFIG}: beta schedule {beta_schedule!r} is not supported (linear, scaled_linear)"
        )
    return DiffusersModelConfig(
        beta_schedule=beta_schedule,
        beta_start=float(scheduler.get("beta_start", 1e-4)),
        beta_end=float(scheduler.get("beta_end", 0.02)),
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        source=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        folder=str(unet_dir),
        unet_class=unet_class,
        unet_config=unet_config,
        scheduler_config=scheduler,
        context_tokens=_context_tokens(pipeline),
    )


class DiffusersDecoder(nn.Module):
    """A pipeline's VAE as the project's first stage: `decode(latents)` -> images in [-1, 1]."""

    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]


def first_stage(cfg: DiffusersModelConfig) -> DiffusersDecoder | None:
    """The pipeline folder's `vae/` (AutoencoderKL); None for a UNet that denoises pixels itself.

    A UNet whose samples are not images (not 1 or 3 channels) without a VAE beside it is
    refused: its latents cannot be written as pictures.
    """
    vae_dir = Path(cfg.folder).parent / "vae"
    if not (vae_dir / "config.json").is_file():
        channels = cfg.sample_shape[0]
        if channels not in (1, 3):
            raise ConfigError(
                f"--config {cfg.source}: its UNet denoises {channels}-channel latents and no vae/ lies beside it: "
                "give the pipeline folder (with vae/)"
            )
        return None
    vae = import_diffusers().AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    return DiffusersDecoder(vae, float(vae.config.get("scaling_factor", 0.18215)))
