"""Import released Q-Diffusion checkpoints (`cifar_w4a8_ckpt.pth`, ...; docs/calibration.md).

A Q-Diffusion checkpoint is the quantized model's state_dict: per layer `P` the fp32 weight, and
`P.weight_quantizer.{alpha, delta, zero_point}` / `P.act_quantizer.{delta, zero_point}` (with `_0`
twins for split layers). Bits, symmetry and the split flag are not stored, so bits come from the
caller and the split is read from the shapes: `alpha` is shaped like the weight group it rounds,
so `alpha.shape[1]` of the first quantizer is the split point.

Weights: AdaRound hard rounding, in fp32,
`W_int = clamp(floor(W / delta) + (alpha >= 0) + zero_point, 0, 2^b - 1)`; a quantizer without
`alpha` (plain rounding) uses `round(W / delta)`. What is stored is `codes = W_int - zero_point`
with scale `delta`: for b <= 7 the codes lie in [-(2^b - 1), 2^b - 1], which is a symmetric
int8 tensor with the same scale, so the asymmetric grid runs on TensorRT's symmetric INT8 exactly.

8-bit asymmetric weights (the decision): codes can reach +-255 and do not fit int8. A channel
whose codes happen to lie in [-128, 127] is kept exactly; any other channel is re-rounded to
symmetric 8-bit per-channel absmax of its *dequantized AdaRound weight*
(scale = max|W_hat| / 127). This adds at most half a new step (about half of delta) of error on
those channels; the import logs and records the number of re-rounded channels and the maximum
weight error (absolute and in units of delta), so the cost is visible per file. Keeping 9-bit
codes instead would be exact in the PyTorch reference but could not be exported to TensorRT.

Activations: `act_quantizer.delta/zero_point` are Q-Diffusion's raw-activation scales (unsigned
b-bit grid with a zero point). They are kept as `kind='raw'` scales, valid only for plain
Q-Diffusion mode (`--no-modulate`). MoDiff needs residual scales, which only calibration gives:
`import_qdiffusion(..., modulate=True)` imports the weights and calibrates residual scales on the
checkpoint's own fp32 weights. Attention quantizers (`act_quantizer_{q,k,v,w}`) are ignored: the
attention matmuls stay in float here, as upstream MoDiff does.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from modiff_trt.calibrators.calibrate import CalibrationOptions, ImportedWeights, base_meta, calibrate, first_last_meta
from modiff_trt.calibrators.collect import input_channels
from modiff_trt.calibrators.fileformat import Calibration, save_calibration
from modiff_trt.errors import CheckpointError, ConfigError
from modiff_trt.models import load_config, load_unet
from modiff_trt.models.checkpoint import read_checkpoint
from modiff_trt.models.config import ModelConfig
from modiff_trt.quant.layer import channel_groups
from modiff_trt.quant.model import quantizable_layers, split_points
from modiff_trt.quant.quantizers import int_range, per_channel_weight
from modiff_trt.quant.scales import LayerScales
from modiff_trt.sampling.sampler import Sampler, make_sampler

log = logging.getLogger(__name__)
INT8_LO, INT8_HI = int_range(8)


def qdiffusion_state(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The flat state_dict of a loaded Q-Diffusion checkpoint, quantizer tensors included."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{source} is not a state_dict: expected a Q-Diffusion checkpoint (torch.save of state_dict)"
        )
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if not any(".weight_quantizer." in k for k in state):
        raise CheckpointError(
            f"{source} has no weight_quantizer tensors: it is not a Q-Diffusion quantized checkpoint; "
            "use --checkpoint for float checkpoints"
        )
    return state


def adaround_codes(
    weight: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, alpha: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Centred integer weights W_int - zero_point of Q-Diffusion's hard rounding (fp32)."""
    w, d, z = weight.float(), delta.float(), zero_point.float()
    base = torch.round(w / d) if alpha is None else torch.floor(w / d) + (alpha >= 0).float()
    return torch.clamp(base + z, 0, 2**bits - 1) - z


def _channel_view(t: torch.Tensor, out: int, like: torch.Tensor) -> torch.Tensor:
    """A per-channel (or per-tensor) quantizer tensor shaped to broadcast against `like`."""
    flat = t.float().reshape(-1)
    if flat.numel() not in (1, out):
        raise CheckpointError(
            f"quantizer tensor of shape {tuple(t.shape)} is neither per-tensor nor per-channel ({out})"
        )
    return flat.expand(out).reshape((out,) + (1,) * (like.dim() - 1))


def _to_int8(codes: torch.Tensor, scale: torch.Tensor, report: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep channels whose codes fit int8; re-round the others to symmetric 8-bit (see module doc)."""
    flat = codes.reshape(codes.shape[0], -1)
    bad = (flat.amin(dim=1) < INT8_LO) | (flat.amax(dim=1) > INT8_HI)
    if not bad.any():
        return codes, scale
    view = (-1,) + (1,) * (codes.dim() - 1)
    old_delta = scale[bad]
    w_hat = codes[bad] * old_delta.view(view)
    new_codes, new_scale, _ = per_channel_weight(w_hat, 8)
    error = (new_codes * new_scale - w_hat).abs().reshape(int(bad.sum()), -1).amax(dim=1)
    codes, scale = codes.clone(), scale.clone()
    codes[bad], scale[bad] = new_codes, new_scale.reshape(-1)
    report["requantized_channels"] = report.get("requantized_channels", 0) + int(bad.sum())
    report["max_weight_error"] = max(report.get("max_weight_error", 0.0), float(error.max()))
    report["max_weight_error_in_delta"] = max(
        report.get("max_weight_error_in_delta", 0.0), float((error / old_delta).max())
    )
    return codes, scale


def _quantizer(state: dict[str, torch.Tensor], layer: str, name: str) -> dict[str, torch.Tensor] | None:
    prefix = f"{layer}.{name}."
    found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return found or None


def _act_scales(
    state: dict[str, torch.Tensor], layer: str, groups: int, source: str
) -> tuple[list[float], list[float]]:
    scales, zero_points = [], []
    for name in ("act_quantizer", "act_quantizer_0")[:groups]:
        q = _quantizer(state, layer, name)
        if q is None or "delta" not in q or "zero_point" not in q:
            raise CheckpointError(
                f"{source}: layer {layer} has no {name}.delta/zero_point; import with act_bits=0 "
                "(--act-bits 0) to take only the weights"
            )
        delta = float(q["delta"].reshape(-1)[0])
        if not delta > 0:
            raise CheckpointError(f"{source}: layer {layer} {name}.delta is {delta}, not a positive scale")
        scales.append(delta)
        zero_points.append(float(q["zero_point"].reshape(-1)[0]))
    return scales, zero_points


def import_layer(
    state: dict[str, torch.Tensor],
    layer: str,
    module: torch.nn.Module,
    weight_bits: int | None,
    act_bits: int | None,
    model_split: int,
    source: str,
    report: dict[str, Any],
) -> tuple[LayerScales, int]:
    """One layer's imported integer weights / raw activation scales, and its detected split."""
    first, second = _quantizer(state, layer, "weight_quantizer"), _quantizer(state, layer, "weight_quantizer_0")
    if first is None or "delta" not in first or "zero_point" not in first:
        raise CheckpointError(
            f"{source}: layer {layer} has no weight_quantizer.delta/zero_point: the checkpoint does not "
            "fit this config, or it is not a Q-Diffusion checkpoint"
        )
    split = 0
    if second is not None:
        split = int(first["alpha"].shape[1]) if "alpha" in first else model_split
        if split != model_split:
            raise CheckpointError(
                f"{source}: layer {layer} is split at input channel {split}, but the model's skip "
                f"concatenation splits at {model_split or 'no channel'}: the checkpoint does not fit this config"
            )
    groups = channel_groups(input_channels(module), split)
    entry = LayerScales()
    if weight_bits is not None:
        weight = module.weight.detach().float()
        codes, scales = [], []
        for quantizer, group in zip((first, second), groups):
            part = weight[:, group]
            alpha = quantizer.get("alpha")
            if alpha is not None and tuple(alpha.shape) != tuple(part.shape):
                raise CheckpointError(
                    f"{source}: layer {layer} alpha {tuple(alpha.shape)} does not match its weight group "
                    f"{tuple(part.shape)}: the checkpoint does not fit this config"
                )
            report["rounding"].add("nearest" if alpha is None else "adaround")
            delta = _channel_view(quantizer["delta"], part.shape[0], part)
            zero_point = _channel_view(quantizer["zero_point"], part.shape[0], part)
            c = adaround_codes(part, delta, zero_point, alpha, weight_bits)
            s = delta.reshape(-1).clone()
            if weight_bits == 8:
                c, s = _to_int8(c, s, report)
            codes.append(c)
            scales.append(s)
        entry.weight_codes, entry.weight_scale = torch.cat(codes, dim=1), torch.stack(scales, dim=1)
    if act_bits is not None:
        entry.act, entry.act_zero_point = _act_scales(state, layer, len(groups), source)
    return entry, split


def read_qdiffusion(
    state: dict[str, torch.Tensor],
    model: torch.nn.Module,
    weight_bits: int | None,
    act_bits: int | None,
    source: str,
) -> ImportedWeights:
    """Rebuild integer weights and raw activation scales of every quantized layer of `model`.

    `model` must already hold the checkpoint's fp32 weights (its `load_unet` result).
    """
    model_splits = split_points(model)
    report: dict[str, Any] = {"rounding": set()}
    layers, splits = {}, {}
    for name in quantizable_layers(model):
        entry, split = import_layer(
            state, name, model.get_submodule(name), weight_bits, act_bits, model_splits.get(name, 0), source, report
        )
        layers[name] = entry
        if split:
            splits[name] = split
    ignored = sorted({k.rsplit(".", 1)[0] for k in state if ".act_quantizer_" in k and ".act_quantizer_0." not in k})
    if ignored:
        log.info("%s: ignored %d attention quantizers (attention matmuls stay in float)", source, len(ignored))
    rounding = report.pop("rounding")
    if report.get("requantized_channels"):
        log.warning(
            "%s: %d weight channel(s) had 8-bit asymmetric codes outside int8 and were re-rounded to symmetric "
            "8-bit; max weight error %.3g (%.2f x delta)",
            source,
            report["requantized_channels"],
            report["max_weight_error"],
            report["max_weight_error_in_delta"],
        )
    report["ignored_quantizers"] = len(ignored)
    label = rounding.pop() if len(rounding) == 1 else ("mixed" if rounding else "none")
    return ImportedWeights(layers=layers, splits=splits, origin="qdiffusion", notes={"rounding": label, **report})


def import_qdiffusion(
    config: str | Path | ModelConfig,
    checkpoint: str | Path,
    out: str | Path,
    options: CalibrationOptions,
    sampler: Sampler | None = None,
    *,
    trust: bool = False,
    progress: bool = True,
) -> Calibration:
    """Import a released Q-Diffusion checkpoint into a calibration file at `out`.

    `options.modulate=False`: integer weights plus Q-Diffusion's own raw-activation scales (kind
    'raw', plain Q-Diffusion mode), no sampling. `options.modulate=True`: the same integer
    weights, with MoDiff residual scales calibrated on the checkpoint's fp32 weights along
    `sampler` (default: the config's). Bits must be given: the file does not store them; the
    split is read from the quantizer shapes, whatever `options.split` says. Every layer, the
    input and output conv too, is imported at `options.weight_bits`: Q-Diffusion's code keeps no
    layer at other bits (BRECQ's `set_first_last_layer_to_8bit` is not in it), so the file records
    `first_last_bits` null whatever `options.first_last_bits` says.
    """
    model_cfg = config if isinstance(config, ModelConfig) else load_config(config)
    options = dataclasses.replace(options, first_last_bits=None)  # Q-Diffusion has no first/last-layer exception
    model = load_unet(model_cfg, checkpoint, trust=trust)
    state = qdiffusion_state(read_checkpoint(checkpoint, trust=trust), str(checkpoint))
    imported = read_qdiffusion(
        state, model, options.weight_bits, None if options.modulate else options.act_bits, str(checkpoint)
    )
    if options.split != bool(imported.splits):
        log.info(
            "split flag ignored: %s splits %d layer(s), read from its quantizer shapes",
            checkpoint,
            len(imported.splits),
        )
    if options.modulate:
        options = dataclasses.replace(options, split=bool(imported.splits))
        return calibrate(
            model_cfg,
            checkpoint,
            out,
            sampler or make_sampler(model_cfg),
            options,
            imported=imported,
            trust=trust,
            progress=progress,
        )
    if sampler is not None:
        raise ConfigError(
            "sampler settings only apply when calibrating (modulate=True); a plain Q-Diffusion "
            "import takes the file's own scales"
        )
    meta = base_meta(
        model_cfg,
        checkpoint,
        kind="raw",
        modulate=False,
        first_step="fp",
        split=bool(imported.splits),
        weight_bits=options.weight_bits,
        **first_last_meta(model, options.quant),
        act_bits=options.act_bits,
        method="qdiffusion",
        weight_method="qdiffusion",
        origin="qdiffusion",
        weights=imported.notes,
        act_scales="raw asymmetric Q-Diffusion scales: valid for plain mode (--no-modulate) only",
        sampler=None,
        trajectories=None,
    )
    log.info(
        "imported %d layers from %s (%s rounding, %d split)",
        len(imported.layers),
        checkpoint,
        imported.notes["rounding"],
        len(imported.splits),
    )
    return save_calibration(out, imported.layers, meta)
