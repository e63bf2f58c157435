"""The DDIM CIFAR-10 UNet (ermongroup/ddim `Model`), in one readable file.

Module paths equal the keys of the official checkpoints (`down.1.attn.0.q.weight`,
`mid.block_1.temb_proj.weight`, ...), so an official state_dict loads without renaming and the
quantizer can name every Conv/Linear by its path. The forward follows the official arithmetic
operation for operation, which is what lets trajectories match it to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DDIMUNetConfig:
    """The `model:` and `data:` fields of an official ddim YAML that shape the network."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    in_channels: int = 3
    resolution: int = 32
    resamp_with_conv: bool = True
    model_type: str = "simple"
    extra: dict[str, Any] = field(default_factory=dict)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding as in ddim/DDPM: frequencies exp(-ln(1e4) i/(half-1)), [sin, cos]."""
    half = dim // 2
    freq = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * -freq)
    emb = timesteps.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # The official model pads right/bottom by one and convolves with stride 2, no padding.
            self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Two GroupNorm-swish-conv stages with a timestep bias; `skip_split` marks skip concats.

    With `temb_channels=0` it is the timestep-free block of the latent-diffusion autoencoder.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, skip_split: int = 0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        # Channels of `h` in an up-block input `cat([h, skip])`: Q-Diffusion's "split" point.
        self.skip_split = skip_split
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q/k/v/proj are 1x1 convs, the matmuls stay float."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1, 1, 0)
        self.k = nn.Conv2d(channels, channels, 1, 1, 0)
        self.v = nn.Conv2d(channels, channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        k = k.reshape(b, c, h * w)
        weights = torch.bmm(q, k) * (int(c) ** (-0.5))
        weights = torch.softmax(weights, dim=2)
        v = v.reshape(b, c, h * w)
        h_ = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class DDIMUNet(nn.Module):
    """ermongroup/ddim `Model`: `eps = model(x, t)` with x in [-1, 1] and t of shape [B]."""

    def __init__(self, cfg: DDIMUNetConfig):
        super().__init__()
        self.config = cfg
        ch, ch_mult = cfg.ch, tuple(cfg.ch_mult)
        self.ch, self.temb_ch = ch, ch * 4
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.resolution = cfg.resolution
        self.in_channels = cfg.in_channels
        if cfg.model_type == "bayesian":
            self.logvar = nn.Parameter(torch.zeros(1000))

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)

        res = cfg.resolution
        in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[level], ch * ch_mult[level]
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, self.temb_ch, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, cfg.resamp_with_conv)
                res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, cfg.dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for i_block in range(cfg.num_res_blocks + 1):
                skip_in = ch * (in_ch_mult[level] if i_block == cfg.num_res_blocks else ch_mult[level])
                up.block.append(
                    ResnetBlock(block_in + skip_in, block_out, self.temb_ch, cfg.dropout, skip_split=block_in)
                )
                block_in = block_out
                if res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in, cfg.resamp_with_conv)
                res *= 2
            self.up.insert(0, up)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one image (C, H, W) this network denoises."""
        return (self.in_channels, self.resolution, self.resolution)

    def end_layers(self) -> tuple[str, str]:
        """The layers that read the image and write the predicted noise (`QuantConfig.first_last_bits`)."""
        return ("conv_in", "conv_out")

    def split_points(self) -> dict[str, int]:
        """Layers whose input is a skip concatenation -> channels of the first group."""
        return {
            f"{name}.nin_shortcut": module.skip_split
            for name, module in self.named_modules()
            if isinstance(module, ResnetBlock) and module.skip_split and hasattr(module, "nin_shortcut")
        }

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(
                f"input is {tuple(x.shape[2:])} pixels, this UNet was built for {self.resolution}x{self.resolution}"
            )
        temb = self.temb.dense[0](timestep_embedding(t, self.ch))
        temb = self.temb.dense[1](swish(temb))

        hs = [self.conv_in(x)]
        for level in range(self.num_resolutions):
            down = self.down[level]
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1]))

        h = self.mid.block_1(hs[-1], temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if level != 0:
                h = up.upsample(h)

        return self.conv_out(swish(self.norm_out(h)))
