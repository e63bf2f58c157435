"""`ModelConfig`: what calibrate, export and sample need to know of any model family.

A config is everything needed to rebuild a UNet and its noise schedule without the original
repository: the architecture, the beta schedule and where the config came from (name or path,
and its sha256 for the export manifest and the calibration file). Each family is one subclass:
`ddim_config.DDIMModelConfig` (ermongroup/ddim) and `latent.LatentModelConfig` (CompVis latent
diffusion and Stable Diffusion). `registry.load_config` turns a name or YAML path into one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from modiff_trt.sampling.schedules import make_betas


@dataclass
class ModelConfig(ABC):
    """Fields and queries shared by every family; subclasses add their architecture."""

    beta_schedule: str
    beta_start: float
    beta_end: float
    num_train_timesteps: int
    source: str
    sha256: str
    raw: dict[str, Any] = field(default_factory=dict, kw_only=True)

    @property
    @abstractmethod
    def family(self) -> str:
        """'ddim', 'ldm' or 'sd': written to manifests and calibration files."""

    @abstractmethod
    def build(self) -> torch.nn.Module:
        """The float UNet with freshly initialised weights (loaders fill it from a checkpoint)."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the UNet denoises: an image for ddim, a latent for LDMs."""

    @property
    def context_shape(self) -> tuple[int, ...] | None:
        """Per-sample cross-attention input shape; None: the UNet takes no context."""
        return None

    @abstractmethod
    def sampler_defaults(self) -> dict[str, Any]:
        """The paper's sampler settings as `sampling.make_sampler` options (`Sampler.to_dict()` keys)."""

    def betas(self) -> torch.Tensor:
        """float32 betas, as ddim's `Diffusion` holds them (the LDM samplers use float64)."""
        return make_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps).float()
