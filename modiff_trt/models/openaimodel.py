"""The CompVis latent-diffusion / Stable Diffusion v1 UNet (``openaimodel.UNetModel``).

Written from the architecture description, not copied. Two constraints shape it:

* Module paths equal the official ``state_dict`` keys (``input_blocks.1.0.in_layers.2.weight``,
  ``middle_block.1.proj_out.weight``, ``out.2.weight`` ...), so official checkpoints load with a
  plain ``load_state_dict`` and Q-Diffusion's per-layer names line up with ours.
* Every Conv1d / Conv2d / Linear is a plain ``torch.nn`` module (the MoDiff quantizer swaps them
  by module path) and attention matmuls are plain ``torch.bmm`` calls that stay in float.

Numerics follow the official forward: GroupNorm32 normalises in float32, the timestep embedding
is ``[cos, sin]`` with frequencies ``exp(-ln(10000) * i / half)`` (the ddim CIFAR model uses
``[sin, cos]`` and ``half - 1``: do not mix them up), legacy attention splits heads before q/k/v.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modiff_trt.errors import ConfigError
from modiff_trt.validate import positive_int, positive_ints

# Keys of the official ``unet_config.params`` that change nothing at inference here.
_IGNORED_PARAMS = frozenset({"use_checkpoint", "use_fp16", "image_size", "dropout", "dims"})
# Sizes that must be positive integers (num_heads & co. take -1 for "derive it").
_POSITIVE_INTS = (
    "in_channels",
    "model_channels",
    "out_channels",
    "num_res_blocks",
    "transformer_depth",
    "num_classes",
    "image_size",
)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture parameters, named as in the official ``unet_config.params``."""

    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    legacy: bool = True
    conv_resample: bool = True
    num_classes: int | None = None
    image_size: int | None = field(default=None, compare=False)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], source: str = "config") -> UNetConfig:
        """Build from an official ``unet_config.params`` mapping, rejecting what we cannot honour.

        Unknown keys raise instead of being dropped, because a silently ignored architecture
        switch would load weights into the wrong graph.
        """
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            if key in known:
                kwargs[key] = value
            elif key in _IGNORED_PARAMS:
                if key == "dims" and int(value) != 2:
                    raise ConfigError(f"{source}: only dims=2 UNets are supported (got {value})")
                if key == "image_size":
                    kwargs[key] = value
            elif key == "n_embed" and value is not None:
                raise ConfigError(f"{source}: codebook-id prediction (n_embed) is not supported")
            else:
                raise ConfigError(f"{source}: unknown unet_config parameter {key!r}")
        for key in ("attention_resolutions", "channel_mult"):
            if key in kwargs:
                kwargs[key] = positive_ints(source, f"unet_config.params.{key}", kwargs[key])
        for key in _POSITIVE_INTS:
            if kwargs.get(key) is not None:
                kwargs[key] = positive_int(source, f"unet_config.params.{key}", kwargs[key])
        if isinstance(kwargs.get("context_dim"), (list, tuple)):
            dims = set(kwargs["context_dim"])
            if len(dims) != 1:
                raise ConfigError(f"{source}: per-depth context_dim lists are not supported")
            kwargs["context_dim"] = dims.pop()
        try:
            cfg = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: incomplete unet_config.params: {exc}") from exc
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Fail early with a readable message instead of an assert deep in the forward."""
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError(f"{source}: set num_heads or num_head_channels")
        if self.use_spatial_transformer and self.context_dim is None:
            raise ConfigError(f"{source}: use_spatial_transformer needs context_dim")
        if self.context_dim is not None and not self.use_spatial_transformer:
            raise ConfigError(f"{source}: context_dim needs use_spatial_transformer: true")
        for mult in self.channel_mult:
            if (mult * self.model_channels) % 32:
                raise ConfigError(
                    f"{source}: channels {mult * self.model_channels} not divisible by the 32 GroupNorm groups"
                )


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]``, ``f_i = exp(-ln(max_period) i / half)``.

    Frequencies are built in float32 exactly like the official code so that the embedding (and
    hence every downstream activation) matches bit for bit on the same device.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 even when the model runs in half precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm32(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``) or, without conv, 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ConfigError("pooling downsample cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding.

    With ``use_scale_shift_norm`` the embedding gives a FiLM scale and shift applied after the
    second norm; otherwise it is added before it. ``up``/``down`` resample both paths between
    the first activation and the first conv (the ``resblock_updown`` variant).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = up or down
        self.in_layers = nn.Sequential(_norm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        # Dropout keeps its slot so that the conv stays at index 3 like the official keys.
        self.out_layers = nn.Sequential(
            _norm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


#: Largest attention score matrix computed at once outside an export trace, in elements (64 MiB in
#: fp32): SD v1's 64x64 latent has 8 heads x 4096 x 4096 scores per sample, 1 GiB per UNet sample
#: in one piece, and the scaled and softmaxed copies double it.
ATTENTION_SLICE_ELEMENTS = 1 << 24


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``softmax(q k^T [* scale]) v`` over [batch*heads, tokens, dim] tensors, softmax in float32."""
    weight = torch.bmm(q, k.transpose(1, 2))
    if scale is not None:
        weight = weight * scale
    return torch.bmm(torch.softmax(weight.float(), dim=-1).type(weight.dtype), v)


def _slice_step(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many batch*heads one slice takes: at most ATTENTION_SLICE_ELEMENTS scores."""
    return max(1, ATTENTION_SLICE_ELEMENTS // (q.shape[1] * k.shape[1]))


def _in_slices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """`_attention` a few batch*heads at a time: each batch*head is its own bmm and row softmax,
    so the slices give the same numbers as one call (bitwise on the CPU)."""
    step = _slice_step(q, k)
    return torch.cat(
        [_attention(q[i : i + step], k[i : i + step], v[i : i + step], scale) for i in range(0, q.shape[0], step)]
    )


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention in slices of at most ATTENTION_SLICE_ELEMENTS scores.

    Why: the score matrices dominate the forward's memory at SD's resolution (issue 21's 8 GB
    bounds on calibration and export). Under an export trace the slicing hides inside
    `_TracedAttention`, so the graph keeps one attention that TensorRT fuses; attention that
    needs no slicing is traced as it is.
    """
    if _slice_step(q, k) >= q.shape[0]:
        return _attention(q, k, v, scale)
    if torch.jit.is_tracing():
        # AttentionBlock (pre-scaled q, k: no `scale`) is traced whole: through _TracedAttention the
        # full-size LSUN-Bedrooms trace fails in TorchScript's peephole pass; its score matrices are small.
        return _attention(q, k, v, scale) if scale is None else _TracedAttention.apply(q, k, v, float(scale))
    return _in_slices(q, k, v, scale)


class _TracedAttention(torch.autograd.Function):
    """Attention as an export sees it: MatMul, Mul by the scale, Softmax, MatMul, what the
    plain bmm code traces to, while the trace itself computes it in slices. Traced plainly, SD's
    score matrices at the export's example batch of 2 hold 2 GB at once, the export's peak."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ARG004
        return _in_slices(q, k, v, scale)

    @staticmethod
    def symbolic(g, q, k, v, scale: float):  # noqa: ANN001, ANN205 - torch.onnx's symbolic protocol
        scores = g.op("MatMul", q, g.op("Transpose", k, perm_i=[0, 2, 1]))
        scores = g.op("Mul", scores, g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32)))
        return g.op("MatMul", g.op("Softmax", scores, axis_i=-1), v)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a fused 1x1 ``qkv`` Conv1d.

    ``new_order=False`` (QKVAttentionLegacy) reads the qkv channels as [heads, (q,k,v), ch];
    ``new_order=True`` (QKVAttention) as [(q,k,v), heads, ch]. Both scale q and k by
    ``ch ** -0.25`` before the product, as upstream does for fp16 stability.
    """

    def __init__(self, channels: int, num_heads: int, new_order: bool = False) -> None:
        super().__init__()
        if channels % num_heads:
            raise ConfigError(f"attention: {channels} channels not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = _norm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        heads, ch = self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        out = sliced_attention((q * scale).transpose(1, 2), (k * scale).transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(out.transpose(1, 2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when context is None)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(p=0.0))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, inner = t.shape
        t = t.reshape(b, n, self.heads, inner // self.heads).permute(0, 2, 1, 3)
        return t.reshape(b * self.heads, n, inner // self.heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = sliced_attention(q, k, v, self.scale)
        bh, n, d = out.shape
        out = out.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3)
        return self.to_out(out.reshape(bh // self.heads, n, self.heads * d))


class GEGLU(nn.Module):
    """Gated GELU: one Linear produces value and gate halves, output ``value * gelu(gate)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width; ``net.1`` is an inert Dropout kept for keys."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(p=0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image -> token sequence -> transformer blocks -> image, with a residual around it all.

    Its GroupNorm uses eps 1e-6 (not GroupNorm32's 1e-5), as in the official code.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int | None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x))
        inner = tokens.shape[1]
        tokens = tokens.reshape(b, inner, h * w).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        tokens = tokens.transpose(1, 2).reshape(b, inner, h, w)
        return self.proj_out(tokens) + x


class EmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and context to transformers."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The openaimodel UNet; ``forward(x, t, context=None, y=None) -> eps``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        mc = config.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)

        def resblock(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, config.use_scale_shift_norm, **kw)

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(self._attention(ch, upsample=False))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                down = (
                    resblock(ch, ch, down=True) if config.resblock_updown else Downsample(ch, config.conv_resample, ch)
                )
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(resblock(ch, ch), self._attention(ch, upsample=False), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers.append(self._attention(ch, upsample=True))
                if level and i == config.num_res_blocks:
                    layers.append(
                        resblock(ch, ch, up=True) if config.resblock_updown else Upsample(ch, config.conv_resample, ch)
                    )
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(_norm32(ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1))

    def end_layers(self) -> tuple[str, str]:
        """The layers that read the image (or latent) and write the predicted noise (`QuantConfig.first_last_bits`)."""
        return ("input_blocks.0.0", "out.2")

    def _attention(self, ch: int, upsample: bool) -> nn.Module:
        """Reproduce the official head-count rules (num_heads vs num_head_channels, legacy)."""
        cfg = self.config
        if cfg.num_head_channels == -1:
            heads, dim_head = cfg.num_heads, ch // cfg.num_heads
        else:
            heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        if cfg.legacy:
            dim_head = ch // heads if cfg.use_spatial_transformer else cfg.num_head_channels
        if cfg.use_spatial_transformer:
            return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim)
        if dim_head == -1:
            block_heads = cfg.num_heads
            if upsample and cfg.num_heads_upsample != -1:
                block_heads = cfg.num_heads_upsample
        else:
            block_heads = ch // dim_head
        return AttentionBlock(ch, block_heads, new_order=cfg.use_new_attention_order)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise ``eps`` for latents ``x`` at timesteps ``t`` (shape [B] or scalar)."""
        if (y is None) != (self.config.num_classes is None):
            raise ValueError("pass y (class labels) exactly when the model is class-conditional")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
