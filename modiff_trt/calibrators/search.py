"""Scale search: turn streamed statistics (or a weight tensor) into symmetric quantizer scales.

Three activation methods, all symmetric because TensorRT accepts only zero point 0:

- `minmax`: the exact absmax over every calibration value. Nothing is clipped, so rare outliers
  stretch the grid; safe at 8 bits, coarse at 4.
- `mse`: Q-Diffusion's search. 80 candidate ranges `absmax * (1 - 0.01 i)`, i = 0..79; keep the
  one with the smallest mean |x - Q(x)|^2.4. The loss is a mean, so it is estimated without bias
  from the per-layer random subsample the collector keeps (see `collect.py`); the candidate set
  starts at the *exact* absmax, so the subsample never shrinks the largest range considered.
- `percentile`: the p-th percentile of |x| (default 99.99) from the subsample, capped at absmax.

Weights are searched per output channel with the same MSE rule (or plain absmax, which the
reference model already applies itself, so `minmax` weights need nothing stored).

Float formats (`fp8`, `nvfp4`) get the same three methods on their own grids, except that NVFP4
has no `mse`: its block scales follow each tensor's 16-channel blocks at run time, which a flat
value subsample cannot replay, so only its tensor scale (an absmax) is calibrated.
"""

from __future__ import annotations

import torch

from modiff_trt.errors import ConfigError
from modiff_trt.quant.formats import fake_quantize_fp8, float_scale
from modiff_trt.quant.quantizers import fake_quantize, quantize, symmetric_scale

METHODS = ("minmax", "mse", "percentile")
WEIGHT_METHODS = ("minmax", "mse", "adaround")  # adaround: calibrators/reconstruct.py
MSE_CANDIDATES = 80
MSE_SHRINK = 0.01
MSE_POWER = 2.4
DEFAULT_PERCENTILE = 99.99


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> str:
    """Validate a method name early, before minutes of trajectory sampling are spent."""
    if method not in allowed:
        raise ConfigError(f"scale method {method!r} is unknown: choose one of {', '.join(allowed)}")
    return method


def _mse_loss(
    x: torch.Tensor, scale: torch.Tensor, bits: int, dim: int | None = None, fmt: str = "int"
) -> torch.Tensor:
    fq = fake_quantize(x, scale, bits) if fmt == "int" else fake_quantize_fp8(x, scale)
    err = (x - fq).abs().pow(MSE_POWER)
    return err.mean() if dim is None else err.mean(dim=dim)


def top_scale(absmax: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """The symmetric scale that maps `absmax` onto the top of format `fmt`'s grid: the largest any search gives."""
    return symmetric_scale(absmax, bits) if fmt == "int" else float_scale(fmt, absmax)


def mse_scale(values: torch.Tensor, absmax: float, bits: int, fmt: str = "int") -> float:
    """Q-Diffusion MSE search over one tensor's values: the best of 80 shrinking symmetric ranges."""
    values = values.float()
    best_scale, best_loss = None, None
    for i in range(MSE_CANDIDATES):
        scale = top_scale(torch.tensor(absmax * (1 - MSE_SHRINK * i)), bits, fmt)
        loss = float(_mse_loss(values, scale, bits, fmt=fmt))
        if best_loss is None or loss < best_loss:  # strict: ties keep the wider range
            best_scale, best_loss = scale, loss
    return float(best_scale)


def activation_scale(
    values: torch.Tensor,
    absmax: float,
    bits: int,
    method: str,
    percentile: float = DEFAULT_PERCENTILE,
    fmt: str = "int",
) -> float:
    """One symmetric activation scale of format `fmt` from a value subsample and the exact absmax
    (for NVFP4: its fp32 tensor scale)."""
    check_method(method)
    check_format_method(fmt, method)
    if method == "minmax" or values.numel() == 0:
        return float(top_scale(torch.tensor(absmax), bits, fmt))
    if method == "mse":
        return mse_scale(values, absmax, bits, fmt)
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile {percentile} must lie in (0, 100]")
    clip = float(torch.quantile(values.abs().float(), percentile / 100.0))
    return float(top_scale(torch.tensor(min(clip, absmax)), bits, fmt))


def check_format_method(fmt: str, method: str) -> None:
    """NVFP4 has no MSE search (see the module docstring): refuse it before trajectories are sampled."""
    if fmt == "nvfp4" and method == "mse":
        raise ConfigError(
            "--method mse cannot search NVFP4 scales (its block scales are set per tensor at run "
            "time): use --method minmax or percentile for --act-format nvfp4"
        )


def mse_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric (codes, scale[O]) chosen by the Q-Diffusion MSE rule.

    Candidates are searched one at a time over all channels at once, so memory stays at a few
    copies of the weight even for the largest CIFAR-10 layers.
    """
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    absmax = flat.abs().amax(dim=1)
    best_scale = symmetric_scale(absmax, bits)
    best_loss = _mse_loss(flat, best_scale[:, None], bits, dim=1)
    for i in range(1, MSE_CANDIDATES):
        scale = symmetric_scale(absmax * (1 - MSE_SHRINK * i), bits)
        loss = _mse_loss(flat, scale[:, None], bits, dim=1)
        better = loss < best_loss
        best_scale = torch.where(better, scale, best_scale)
        best_loss = torch.where(better, loss, best_loss)
    view = (-1,) + (1,) * (weight.dim() - 1)
    return quantize(weight.detach().float(), best_scale.view(view), bits), best_scale
