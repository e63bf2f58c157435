"""First-stage decoders of latent diffusion: KL-f8 (AutoencoderKL) and VQ-f4 (VQModelInterface).

Only the decoding half is built: sampling never encodes images. Module paths equal the official
``first_stage_model.*`` keys minus that prefix (``post_quant_conv``, ``decoder.up.1.block.0.conv1``,
``quantize.embedding``), so the decoder loads from the same Lightning checkpoint as the UNet and
the encoder's keys are simply not read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modiff_trt.errors import ConfigError

# The decoder is built from the same blocks as the ddim UNet (timestep-free ResnetBlocks), as upstream.
from modiff_trt.models.ddim_unet import AttnBlock, ResnetBlock, Upsample, group_norm, swish
from modiff_trt.validate import positive_int, positive_ints

log = logging.getLogger(__name__)

_KL_TARGETS = ("AutoencoderKL",)
_VQ_TARGETS = ("VQModel", "VQModelInterface")


@dataclass(frozen=True)
class FirstStageConfig:
    """The decoder-relevant part of ``first_stage_config`` (official names)."""

    kind: str  # "kl" or "vq"
    embed_dim: int
    z_channels: int
    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    n_embed: int | None = None
    resamp_with_conv: bool = True
    tanh_out: bool = False

    @classmethod
    def from_yaml(cls, section: Mapping[str, Any], source: str = "config") -> FirstStageConfig:
        """Parse ``model.params.first_stage_config`` (``target`` + ``params.ddconfig``)."""
        target = str(section.get("target", ""))
        params = section.get("params") or {}
        dd = params.get("ddconfig") or {}
        name = target.rsplit(".", 1)[-1]
        if name in _KL_TARGETS:
            kind = "kl"
        elif name in _VQ_TARGETS:
            kind = "vq"
        else:
            raise ConfigError(f"{source}: unsupported first_stage_config target {target!r}")
        if dd.get("attn_type", "vanilla") != "vanilla" or dd.get("use_linear_attn"):
            raise ConfigError(f"{source}: only vanilla decoder attention is supported")
        ddconfig = "first_stage_config.params.ddconfig"
        try:
            return cls(
                kind=kind,
                embed_dim=positive_int(source, "first_stage_config.params.embed_dim", params["embed_dim"]),
                z_channels=positive_int(source, f"{ddconfig}.z_channels", dd["z_channels"]),
                ch=positive_int(source, f"{ddconfig}.ch", dd["ch"]),
                out_ch=positive_int(source, f"{ddconfig}.out_ch", dd["out_ch"]),
                ch_mult=positive_ints(source, f"{ddconfig}.ch_mult", dd["ch_mult"]),
                num_res_blocks=positive_int(source, f"{ddconfig}.num_res_blocks", dd["num_res_blocks"]),
                attn_resolutions=positive_ints(
                    source, f"{ddconfig}.attn_resolutions", dd.get("attn_resolutions") or ()
                ),
                resolution=positive_int(source, f"{ddconfig}.resolution", dd["resolution"]),
                n_embed=(
                    positive_int(source, "first_stage_config.params.n_embed", params["n_embed"])
                    if kind == "vq"
                    else None
                ),
                resamp_with_conv=bool(dd.get("resamp_with_conv", True)),
                tanh_out=bool(dd.get("tanh_out", False)),
            )
        except KeyError as exc:
            raise ConfigError(f"{source}: first_stage_config lacks {exc.args[0]!r}") from exc

    @property
    def downsampling(self) -> int:
        """Spatial factor between image and latent (8 for KL-f8, 4 for VQ-f4)."""
        return 2 ** (len(self.ch_mult) - 1)


class Decoder(nn.Module):
    """``ldm.modules.diffusionmodules.model.Decoder`` layout: conv_in, mid, up[levels], out."""

    def __init__(self, cfg: FirstStageConfig) -> None:
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_channels=0, dropout=0.0)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_channels=0, dropout=0.0)
        ups: list[nn.Module] = []
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, temb_channels=0, dropout=0.0))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in, cfg.resamp_with_conv)
                res *= 2
            ups.insert(0, up)
        # Index i of ``up`` is resolution level i (0 = full size), as in the official keys.
        self.up = nn.ModuleList(ups)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)
        self.tanh_out = cfg.tanh_out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        h = self.conv_out(swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class VectorQuantizer(nn.Module):
    """Nearest-codebook lookup (``quantize.embedding``), the decode-time half of VQ-GAN's VQ."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.embedding.weight
        # Same expansion as upstream (|z|^2 + |e|^2 - 2 z.e) so near-ties resolve identically.
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)[None] - 2 * flat @ codes.t()
        idx = torch.argmin(dist, dim=1)
        return self.embedding(idx).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


class FirstStageDecoder(nn.Module):
    """Latent -> image in [-1, 1]: ``decode(z)`` divides by ``scale_factor`` first, like
    ``LatentDiffusion.decode_first_stage``; VQ models snap to the codebook before decoding."""

    def __init__(self, cfg: FirstStageConfig, scale_factor: float = 1.0) -> None:
        super().__init__()
        self.config = cfg
        self.scale_factor = float(scale_factor)
        if cfg.kind == "vq":
            if cfg.n_embed is None:
                raise ConfigError("VQ first stage needs n_embed")
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an *unscaled* first-stage latent (what the autoencoder's own decode takes)."""
        if hasattr(self, "quantize"):
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a diffusion-model latent: ``forward(z / scale_factor)``."""
        return self(z / self.scale_factor)


def build_first_stage(cfg: FirstStageConfig, scale_factor: float = 1.0) -> FirstStageDecoder:
    """Build the decoder with random weights (load them with ``load_first_stage``)."""
    return FirstStageDecoder(cfg, scale_factor)
