"""`QuantLayer`: one Conv/Linear with fake-quantized weights, activations and MoDiff state.

This is the oracle every deployed graph is tested against, so it spells out the MoDiff layer
of docs/architecture.md literally:

- plain (Q-Diffusion):   out = f(Q(x), Wq) + b
- MoDiff warm-up:        a_hat = x (fp) or Q0(x) (quantized); o_hat = f(a_hat, Wq) + b
- MoDiff later steps:    rq = Q(x - a_hat); a_hat += rq; o_hat += f(rq, Wq)   (no bias)
- constant-input layers: o_hat unchanged (their residual is exactly 0); no a_hat is kept
- state_layout 'scaled': a_hat is kept as A = a_hat / s (s: the step scale of each input channel,
  `state_unit`), read back as A * s and advanced as A + rq / s, the ops the graphs run

With step groups, Q of step group g is the group-0 quantizer folded by the float32 ratios of
`scale_ratios`: Q_g(r) = Q(r * s_0/s_g) * s_g/s_0, exactly what the deployed graphs compute.

The state lives for one batch; `reset_state()` starts the next one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modiff_trt.errors import ConfigError
from modiff_trt.quant.config import QuantConfig
from modiff_trt.quant.formats import fake_quantize_float, float_scale, layer_format
from modiff_trt.quant.quantizers import asymmetric_params, fake_quantize, per_channel_weight, symmetric_scale
from modiff_trt.quant.scales import LayerScales

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def layer_kind(module: nn.Module) -> str:
    """'conv1d' | 'conv2d' | 'linear': the kind recorded in manifests."""
    for cls, kind in ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Linear, "linear")):
        if isinstance(module, cls):
            return kind
    raise TypeError(f"{type(module).__name__} is not a quantizable layer")


def compact_codes(codes: torch.Tensor) -> torch.Tensor:
    """Integer weight codes in the smallest signed type that holds them: int8, or int16 for the
    [-255, 255] of a centred 8-bit asymmetric grid (which no export accepts, but the reference runs)."""
    if not codes.dtype.is_floating_point:
        return codes if codes.dtype in (torch.int8, torch.int16) else codes.to(torch.int16)
    fits_int8 = bool(codes.numel() == 0 or (codes.min() >= -128 and codes.max() <= 127))
    return codes.round().to(torch.int8 if fits_int8 else torch.int16)


def channel_groups(channels: int, split: int) -> list[slice]:
    """Input-channel groups: the whole tensor, or [:split] and [split:] for a skip concat."""
    if split <= 0 or split >= channels:
        return [slice(0, channels)]
    return [slice(0, split), slice(split, channels)]


class QuantLayer(nn.Module):
    """A quantized Conv1d/Conv2d/Linear that carries `a_hat`/`o_hat` across denoising steps.

    `weight_bits` is this layer's width (None: float weights): `config.weight_bits`, or more for
    the UNet's end layers (`QuantConfig.first_last_bits`, `quant.model.layer_weight_bits`).
    """

    def __init__(self, module: nn.Module, name: str, config: QuantConfig, split: int = 0, *, weight_bits: int | None):
        super().__init__()
        self.name, self.kind, self.config = name, layer_kind(module), config
        self.weight_bits = weight_bits
        self.module = module
        self.format = layer_format(module, config.act_format, config.act_bits, config.format_layers == "all")
        self.act_bits = self.format.bits or None
        in_channels = module.weight.shape[1] * (module.groups if self.kind != "linear" else 1)
        self.groups = channel_groups(in_channels, split)
        self.split = split if len(self.groups) == 2 else 0
        self.state_dtype = STATE_DTYPES[config.state_dtype]
        self.scales = LayerScales()
        self.ratios: list[tuple[list[float], list[float]]] | None = None  # per step group (scale_ratios)
        self.step_ratio: tuple[list[float], list[float]] | None = None  # this step's (pre, post); None: 1
        self.a_hat: torch.Tensor | None = None
        self.o_hat: torch.Tensor | None = None
        # Buffers, so `.to(device)` moves them; not persistent: calibration files carry them.
        self.register_buffer("weight_codes", None, persistent=False)
        self.register_buffer("weight_scale", None, persistent=False)
        self.set_weight_codes(*self._round_weight())

    # -- weights ---------------------------------------------------------------------------
    def _round_weight(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        bits = self.weight_bits
        if bits is None:
            return None, None
        weight = self.module.weight.detach().float()
        codes, scales = [], []
        for group in self.groups:
            q, scale, zero_point = per_channel_weight(weight[:, group], bits, self.config.weight_symmetric)
            codes.append(q if zero_point is None else q - zero_point)
            scales.append(scale.reshape(-1))
        return torch.cat(codes, dim=1), torch.stack(scales, dim=1)

    def set_weight_codes(self, codes: torch.Tensor | None, scale: torch.Tensor | None) -> None:
        """Use integer weights `codes` (centred, W_int - z) with per-channel scales [O, groups].

        Only the integer codes are kept (int8, what exports carry; int16 for 8-bit asymmetric
        grids): the dequantized weight is made per call (`w_deq`). A persistent fp32 copy would
        be a third copy of the weights beside the float model's and the codes: 3.4 GB for SD v1.
        """
        if codes is None:
            self.weight_codes = self.weight_scale = None
            return
        if scale.dim() == 1:
            scale = scale[:, None]
        if codes.shape != self.module.weight.shape or scale.shape != (codes.shape[0], len(self.groups)):
            raise ConfigError(
                f"layer {self.name}: integer weights {tuple(codes.shape)} / scales {tuple(scale.shape)} do not "
                f"fit weight {tuple(self.module.weight.shape)} with {len(self.groups)} channel group(s)"
            )
        self.weight_codes, self.weight_scale = compact_codes(codes), scale.float()

    @property
    def w_deq(self) -> torch.Tensor:
        """The weight the layer computes with: codes x per-channel scale, or the float weight when
        weights stay float."""
        if self.weight_codes is None:
            return self.module.weight.detach().float()
        view = (-1,) + (1,) * (self.weight_codes.dim() - 1)
        parts = [
            self.weight_codes[:, g].float() * self.weight_scale[:, i].view(view) for i, g in enumerate(self.groups)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # -- activations ------------------------------------------------------------------------
    def _quantize_act(
        self,
        x: torch.Tensor,
        scales: list[float] | None,
        zero_points: list[float] | None,
        ratio: tuple[list[float], list[float]] | None = None,
    ) -> torch.Tensor:
        bits, fmt = self.act_bits, self.format.format
        if bits is None:
            return x
        static = self.config.act_scales == "static"
        if static and scales is None:
            raise ConfigError(
                f"layer {self.name} has no static activation scale: calibrate first "
                "(`modiff-trt calibrate`) or use act_scales='dynamic'"
            )
        parts = []
        for i, group in enumerate(self.groups):
            part = self._channels(x, group)
            if static:
                scale = torch.tensor(scales[i], dtype=x.dtype, device=x.device)
                zp = None if zero_points is None else torch.tensor(zero_points[i], dtype=x.dtype, device=x.device)
            elif fmt != "int":
                scale, zp = float_scale(fmt, part.abs().amax()), None
            elif self.config.act_symmetric:
                scale, zp = symmetric_scale(part.abs().amax(), bits), None
            else:
                scale, zp = asymmetric_params(part.amin(), part.amax(), bits)
            if ratio is not None:  # step group g: Q(r * s_0/s_g) * s_g/s_0 around group 0's scale
                pre, post = (torch.tensor(r[i], dtype=x.dtype, device=x.device) for r in ratio)
                part = part * pre
            fq = (
                fake_quantize(part, scale, bits, zp)
                if fmt == "int"
                else fake_quantize_float(fmt, part, scale, self.channel_dim)
            )
            parts.append(fq if ratio is None else fq * post)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.channel_dim)

    def quantize_step_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x) with the layer's step scales and this step's step-group ratio: what a later step's
        residual becomes."""
        return self._quantize_act(x, self.scales.act, self.scales.act_zero_point, self.step_ratio)

    @property
    def channel_dim(self) -> int:
        """The input's channel dim: the last for a Linear (SpatialTransformer Linears see
        [B, tokens, C]), 1 for a conv. NVFP4 blocks run along it."""
        return -1 if self.kind == "linear" else 1

    def _channels(self, x: torch.Tensor, group: slice) -> torch.Tensor:
        """Input channels `group` of x."""
        return x[..., group] if self.kind == "linear" else x[:, group]

    def apply_weight(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """f(x, Wq) (+ b): the layer's own op with the dequantized weight."""
        b = self.module.bias if bias else None
        if self.kind == "linear":
            return F.linear(x, self.w_deq, b)
        conv = F.conv2d if self.kind == "conv2d" else F.conv1d
        m = self.module
        return conv(x, self.w_deq, b, m.stride, m.padding, m.dilation, m.groups)

    # -- state ------------------------------------------------------------------------------
    def reset_state(self) -> None:
        self.a_hat = self.o_hat = None

    def state_unit(self) -> torch.Tensor | None:
        """The unit `a_hat` is stored in under state_layout 'scaled': each input channel's step scale,
        shaped to broadcast over the input ([C, 1, 1] conv2d, [C, 1] conv1d, [C] linear). None when
        a_hat is stored as is: plain layout, float activations, or no a_hat (constant input).

        In these units a_hat is the integer sum of the residual codes (plus the warm-up input), so an
        fp16 state holds it exactly while |A| <= 2048 instead of rounding a_hat every step."""
        s = self.scales
        if self.config.state_layout != "scaled" or self.act_bits is None or s.constant_input or s.act is None:
            return None
        sizes = [g.stop - g.start for g in self.groups]
        unit = torch.cat([torch.full((n,), float(v), dtype=torch.float32) for n, v in zip(sizes, s.act)])
        return unit if self.kind == "linear" else unit.view(-1, *([1] * (1 if self.kind == "conv1d" else 2)))

    def _store_a_hat(self, a_hat: torch.Tensor, unit: torch.Tensor | None) -> torch.Tensor:
        """a_hat as carried between steps: itself, or A = a_hat / unit, in the state dtype."""
        return (a_hat if unit is None else a_hat / unit.to(a_hat.dtype)).detach().to(self.state_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scales
        unit = self.state_unit()
        if not self.config.modulate:
            return self.apply_weight(self._quantize_act(x, s.act, s.act_zero_point), bias=True)
        if self.o_hat is None:
            a_hat = x if self.config.first_step == "fp" else self._quantize_act(x, s.warmup, s.warmup_zero_point)
            o_hat = self.apply_weight(a_hat, bias=True)
        elif s.constant_input:
            return self.o_hat.to(x.dtype)
        else:
            prev_a, prev_o = self.a_hat.to(x.dtype), self.o_hat.to(x.dtype)
            if unit is None:
                rq = self.quantize_step_input(x - prev_a)
                a_hat = prev_a + rq
            else:  # prev_a is A: a_hat = A * s, A' = A + rq / s (stored as is below)
                unit = unit.to(x.dtype)
                rq = self.quantize_step_input(x - prev_a * unit)
                a_hat, unit = prev_a + rq / unit, None
            o_hat = prev_o + self.apply_weight(rq, bias=False)
        self.a_hat = None if s.constant_input else self._store_a_hat(a_hat, unit)
        self.o_hat = o_hat.detach().to(self.state_dtype)
        return o_hat

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{self.name}, {self.kind}, w{self.weight_bits}a{self.act_bits} {self.format.format}, "
            f"modulate={c.modulate}, split={self.split}"
        )
