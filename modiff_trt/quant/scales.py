"""Static quantization parameters handed from a calibration to the quantized model.

Kept apart from the calibrators so the reference model does not depend on how scales were
found (MSE search, a Q-Diffusion checkpoint import, a file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerScales:
    """Static parameters of one layer; lists hold one value per channel group (2 when split).

    `act` quantizes what the later steps feed the layer (the residual x - a_hat for MoDiff, the
    raw input for plain Q-Diffusion); `warmup` quantizes the first step's raw input (MoDiff with
    first_step='quantized'). Zero points are None for symmetric quantizers. `weight_codes` are
    integer weights centred on their zero point (W_int - z) and `weight_scale` their per-output
    channel scales [O, groups]: imported rounded weights replace the layer's own rounding.

    `constant_input`: the layer's input never changed between calibration steps (residual absmax
    exactly 0 at every step), like Stable Diffusion's cross-attention `to_k`/`to_v` reading the
    text context. Its residual is then exactly 0, so MoDiff steps pass `o_hat` through: no
    quantizer, no matmul, and no `a_hat` to carry.
    """

    act: list[float] | None = None
    act_zero_point: list[float] | None = None
    warmup: list[float] | None = None
    warmup_zero_point: list[float] | None = None
    weight_codes: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    constant_input: bool = False


@dataclass
class ScaleSet:
    """Scales for every quantized layer, and what kind of activation they were measured on."""

    modulate: bool  # True: `act` are residual scales (MoDiff); False: raw-activation scales
    layers: dict[str, LayerScales] = field(default_factory=dict)
    source: str = "calibration"
