"""`LatentModelConfig`: the latent-diffusion / Stable Diffusion family of `ModelConfig`.

calibrate, export and sample are written against `ModelConfig` (build(), betas(),
sample_shape, source, sha256). An `LDMConfig` parsed by `ldm_config` is wrapped here so the
same code paths work; what differs from the ddim family is made explicit:

- `sample_shape` is the latent shape (C, H, W), not an image shape;
- `context_shape` is the cross-attention input per sample ([77, 768] for SD v1, None otherwise);
- the schedule is LatentDiffusion's: its 'linear' is linear in sqrt(beta), which this project
  calls 'scaled_linear' (and LDM's 'sqrt_linear' is a plain linspace, this project's 'linear');
- `sampler_defaults()` names the LDM samplers (`ldm-ddim`, `plms`), whose timesteps follow the
  LDM DDIM convention `range(0, T, T // S) + 1`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modiff_trt.errors import ConfigError
from modiff_trt.models.config import ModelConfig
from modiff_trt.models.ldm_config import LDMConfig, parse_ldm_params, resolve_ldm_config
from modiff_trt.models.openaimodel import UNetConfig, UNetModel

#: Token count of CLIP ViT-L/14 prompts (FrozenCLIPEmbedder pads to it): SD's context length.
CONTEXT_TOKENS = 77
#: LatentDiffusion schedule name -> this project's name for the same betas (`schedules.make_betas`).
LDM_TO_SCHEDULE = {"linear": "scaled_linear", "sqrt_linear": "linear"}


@dataclass
class LatentModelConfig(ModelConfig):
    """An openaimodel UNet (family 'ldm' unconditional, 'sd' with cross-attention context).

    `ldm` keeps the whole parsed config: the first-stage decoder and the paper's sampler
    settings live there.
    """

    ldm: LDMConfig
    context: tuple[int, int] | None = None

    @property
    def unet(self) -> UNetConfig:
        return self.ldm.unet

    @property
    def family(self) -> str:
        return "ldm" if self.context is None else "sd"

    def build(self) -> torch.nn.Module:
        return UNetModel(self.unet)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.ldm.latent_shape

    @property
    def context_shape(self) -> tuple[int, int] | None:
        return self.context

    def sampler_defaults(self) -> dict[str, Any]:
        """The paper's sampler settings; an official SD YAML names none, so SD gets PLMS with guidance 7.5."""
        if self.family == "sd" and (self.ldm.sampler, self.ldm.guidance_scale) == ("ddim", 1.0):
            return {"sampler": "plms", "steps": 50, "guidance_scale": 7.5}
        return {
            "sampler": "ldm-ddim" if self.ldm.sampler == "ddim" else self.ldm.sampler,
            "steps": self.ldm.steps,
            "eta": self.ldm.eta,
            "guidance_scale": self.ldm.guidance_scale,
        }


def latent_model_config(
    ldm: LDMConfig, source: str, sha256: str, raw: dict[str, Any] | None = None
) -> LatentModelConfig:
    """Wrap a parsed LDM config; family 'sd' when the UNet takes cross-attention context."""
    if ldm.beta_schedule not in LDM_TO_SCHEDULE:
        raise ConfigError(f"{source}: beta_schedule {ldm.beta_schedule!r} is not supported (linear, sqrt_linear)")
    conditional = ldm.conditioning_key == "crossattn"
    return LatentModelConfig(
        beta_schedule=LDM_TO_SCHEDULE[ldm.beta_schedule],
        beta_start=ldm.linear_start,
        beta_end=ldm.linear_end,
        num_train_timesteps=ldm.timesteps,
        source=source,
        sha256=sha256,
        raw=raw or {},
        ldm=ldm,
        context=(CONTEXT_TOKENS, int(ldm.unet.context_dim)) if conditional else None,
    )


def builtin_latent_config(name: str) -> LatentModelConfig:
    """A built-in LDM name (`ldm-churches`, ...); its sha256 hashes the parsed config itself,
    so it changes exactly when the architecture or schedule it describes changes."""
    ldm = resolve_ldm_config(name)
    return latent_model_config(ldm, name, hashlib.sha256(repr(ldm).encode()).hexdigest())


def yaml_latent_config(raw: dict[str, Any], source: str, sha256: str) -> LatentModelConfig:
    """An official latent-diffusion / stable-diffusion YAML already read by `registry.load_config`."""
    ldm = parse_ldm_params(raw["model"]["params"], name=Path(source).stem, source=source)
    return latent_model_config(ldm, source, sha256, raw)
