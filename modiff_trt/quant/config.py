"""`QuantConfig`: what to quantize and how, the one object every stage agrees on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from modiff_trt.errors import ConfigError
from modiff_trt.quant.formats import ACT_FORMATS, FORMAT_BITS

MIN_BITS, MAX_BITS = 2, 8


def _bits(value: int | None) -> str | None:
    """The range `validate.dataclass_fields` checks a stored `quant` section's bits against (null: float)."""
    return None if value is None or MIN_BITS <= value <= MAX_BITS else f"within {MIN_BITS}..{MAX_BITS}"


_BITS = {"check": _bits}


@dataclass(frozen=True)
class QuantConfig:
    """MoDiff/Q-Diffusion quantization settings.

    `weight_bits`/`act_bits` of None keep that side in float (weight-only or act-only runs).
    `act_scales='static'` takes per-layer scales from a calibration (what TensorRT needs);
    `'dynamic'` recomputes a per-tensor scale from every tensor (the upstream default).
    `first_step='fp'` runs the first step with float activations (upstream); `'quantized'`
    quantizes the first input with its own scale. `split` quantizes the two channel groups of a
    skip concatenation separately (Q-Diffusion). `state_dtype` is the precision `a_hat`/`o_hat`
    are carried in between steps; `state_layout='scaled'` carries `a_hat` in units of the layer's
    residual scale (A = a_hat / s, a sum of integer codes that fp16 holds exactly up to 2048)
    instead of as a_hat itself (`'plain'`), see docs/design-decisions.md. `act_format` picks the activation grid: `int` (b-bit integers),
    `fp8` (E4M3, 8 bits) or `nvfp4` (E2M1 in 16-channel blocks, 4 bits); with `format_layers`
    'tensorrt' each layer falls back to the format TensorRT can run it in (`formats.layer_format`),
    with 'all' every layer takes the requested format (a reference-only study).
    `first_last_bits` are the weight bits of the UNet's first and last layer (its input and
    output conv, `model.end_layers()`) when `weight_bits` is lower: BRECQ's convention, because
    the output conv of a small-channel UNet has one 4-bit scale per output channel for the whole
    predicted noise (the digits model: 1 channel). None gives them `weight_bits` like every layer.
    """

    weight_bits: int | None = field(default=8, metadata=_BITS)
    act_bits: int | None = field(default=8, metadata=_BITS)
    modulate: bool = True
    act_scales: Literal["dynamic", "static"] = "dynamic"
    first_step: Literal["fp", "quantized"] = "fp"
    weight_symmetric: bool = True
    act_symmetric: bool = True
    split: bool = False
    state_dtype: Literal["float32", "float16"] = "float32"
    state_layout: Literal["plain", "scaled"] = "plain"
    act_format: Literal["int", "fp8", "nvfp4"] = "int"
    format_layers: Literal["tensorrt", "all"] = "tensorrt"
    first_last_bits: int | None = field(default=8, metadata=_BITS)

    def __post_init__(self) -> None:
        for label, bits in (
            ("weight_bits", self.weight_bits),
            ("act_bits", self.act_bits),
            ("first_last_bits", self.first_last_bits),
        ):
            if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
                raise ConfigError(f"{label}={bits} is outside {MIN_BITS}..{MAX_BITS} (0/None keeps it in float)")
        choices = {
            "act_scales": ("dynamic", "static"),
            "first_step": ("fp", "quantized"),
            "state_dtype": ("float32", "float16"),
            "state_layout": ("plain", "scaled"),
            "act_format": ACT_FORMATS,
            "format_layers": ("tensorrt", "all"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        width = FORMAT_BITS.get(self.act_format)
        if width is not None and self.act_bits not in (None, width):
            raise ConfigError(
                f"act_format={self.act_format!r} is a {width}-bit format: set act_bits to {width} "
                f"(--act-bits {width}), not {self.act_bits}"
            )
        if width is not None and not self.act_symmetric:
            raise ConfigError(
                f"act_format={self.act_format!r} is symmetric by construction: drop asymmetric activations"
            )

    @property
    def end_weight_bits(self) -> int | None:
        """Weight bits of the first and last layer: never fewer than `weight_bits` (float stays float)."""
        if self.weight_bits is None or self.first_last_bits is None:
            return self.weight_bits
        return max(self.weight_bits, self.first_last_bits)

    @property
    def label(self) -> str:
        """Short name used in reports: `modiff-w8a4`, `qdiff-w8a8`, `modiff-w8-nvfp4`, `fp32`."""
        if self.weight_bits is None and self.act_bits is None:
            return "fp32"
        w = f"w{self.weight_bits}" if self.weight_bits else "wfp"
        a = f"a{self.act_bits}" if self.act_bits else "afp"
        if self.act_bits and self.act_format != "int":
            a = f"-{self.act_format}" + ("-all" if self.format_layers == "all" else "")
        return f"{'modiff' if self.modulate else 'qdiff'}-{w}{a}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"unknown quantization settings: {', '.join(sorted(unknown))}")
        return cls(**data)
