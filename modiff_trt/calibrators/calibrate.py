"""`calibrate`: full-precision trajectories -> static per-layer scales -> a calibration file.

TensorRT needs activation scales as build-time constants, and MoDiff quantizes the residual
between steps rather than the raw input, so its scales must be measured on residuals
(docs/calibration.md). This module wires the collector (`collect.py`) to the scale search
(`search.py`) and the file format (`fileformat.py`), and records how long it took and how much
memory it needed, because CIFAR-size calibrations are the slowest offline step of a deployment.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modiff_trt import __version__
from modiff_trt.calibrators.collect import (
    DEFAULT_RESERVOIR,
    TrajectoryCollector,
    TrajectoryFn,
    calibration_steps,
    input_channels,
)
from modiff_trt.calibrators.fileformat import Calibration, save_calibration
from modiff_trt.calibrators.search import (
    DEFAULT_PERCENTILE,
    WEIGHT_METHODS,
    activation_scale,
    check_method,
    mse_weight,
)
from modiff_trt.errors import ConfigError
from modiff_trt.export.manifest import sha256_file
from modiff_trt.models import load_config, load_unet
from modiff_trt.models.config import ModelConfig
from modiff_trt.models.latent import LatentModelConfig
from modiff_trt.quant.config import MAX_BITS, MIN_BITS
from modiff_trt.quant.layer import channel_groups
from modiff_trt.quant.model import quantizable_layers
from modiff_trt.quant.scales import LayerScales
from modiff_trt.sampling.conditioning import ContextSource
from modiff_trt.sampling.ldm_run import LDMSampling, sampling_for, trajectory_fn

if TYPE_CHECKING:
    from modiff_trt.calibrators.qdiffusion import QDiffusionImport

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_bits(label: str, bits: int | None) -> None:
    if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{label}={bits} is outside {MIN_BITS}..{MAX_BITS} (0/None keeps it in float)")


def model_splits(model: torch.nn.Module, split: bool) -> dict[str, int]:
    """Layer -> first channel group size, as `quantize_unet(split=True)` will use it."""
    return model.split_points() if split and hasattr(model, "split_points") else {}


def base_meta(model_cfg: ModelConfig, checkpoint: str | Path | None, **fields: Any) -> dict[str, Any]:
    """Metadata every calibration file carries: what it was measured on, and with which tool."""
    return {
        "config": {"source": model_cfg.source, "sha256": model_cfg.sha256},
        "checkpoint": {
            "path": None if checkpoint is None else str(Path(checkpoint).resolve()),
            "sha256": None if checkpoint is None else sha256_file(checkpoint),
        },
        "tool_version": __version__,
        **fields,
    }


def measure_activations(
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    timesteps: list[int],
    *,
    eta: float,
    cali_st: int,
    cali_n: int,
    batch_size: int,
    act_bits: int,
    method: str,
    modulate: bool,
    seed: int,
    splits: dict[str, int],
    percentile: float = DEFAULT_PERCENTILE,
    reservoir: int = DEFAULT_RESERVOIR,
    progress: bool = True,
    trajectory: TrajectoryFn | None = None,
    num_calls: int | None = None,
) -> dict[str, LayerScales]:
    """Static activation scales per layer: residual (+ warm-up) scales for MoDiff, raw for plain.

    `trajectory` and `num_calls` (model calls per trajectory) replace the DDIM loop for latent
    diffusion, whose samplers may call the UNet more often than there are timesteps (PLMS).
    """
    steps = calibration_steps(num_calls or len(timesteps), cali_st, modulate)
    log.info("calibrating %s at steps %s of %d (%d trajectories)",
             "residuals" if modulate else "raw inputs", steps, len(timesteps), cali_n)
    n_batches = -(-cali_n // batch_size)
    collector = TrajectoryCollector(model, steps, modulate, n_batches, splits, reservoir, seed)
    stats = collector.run(model_cfg.sample_shape, timesteps, model_cfg.betas(), eta, cali_n, batch_size, seed, progress,
                          trajectory=trajectory)

    def scales(group_stats):
        return [activation_scale(s.values(), s.absmax, act_bits, method, percentile) for s in group_stats]

    return {
        name: LayerScales(act=scales(s.act), warmup=None if s.warmup is None else scales(s.warmup))
        for name, s in stats.items()
    }


def mse_weights(
    model: torch.nn.Module, bits: int, splits: dict[str, int]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MSE-searched symmetric per-channel weights (codes, scale [O, groups]) for every layer."""
    out = {}
    for name in quantizable_layers(model):
        module = model.get_submodule(name)
        weight = module.weight.detach().float().cpu()
        groups = channel_groups(input_channels(module), splits.get(name, 0))
        parts = [mse_weight(weight[:, g], bits) for g in groups]
        out[name] = (torch.cat([c for c, _ in parts], dim=1), torch.stack([s for _, s in parts], dim=1))
    return out


def _latent_sampling(
    model_cfg: ModelConfig, steps: int, sampler: str | None, eta: float | None, guidance_scale: float | None,
    conditioning: ContextSource | None, seed: int,
) -> tuple[LDMSampling, TrajectoryFn] | None:
    """The LDM sampler settings and the collector's trajectory, or None for ddim configs."""
    if not isinstance(model_cfg, LatentModelConfig):
        return None
    sampling = sampling_for(model_cfg, sampler, steps, eta, guidance_scale)
    if model_cfg.context_shape is not None and conditioning is None:
        raise ConfigError(f"{model_cfg.source} is text-conditioned: calibrate with prompts (--prompt/--from-file "
                          "and --text-encoder DIR) or random context (--random-context, for tests)")
    return sampling, trajectory_fn(model_cfg, sampling, seed, conditioning)


def calibrate(
    config: str | Path | ModelConfig,
    checkpoint: str | Path | None,
    out: str | Path,
    steps: int = 100,
    skip_type: str = "quad",
    eta: float | None = None,
    cali_st: int = 20,
    cali_n: int = 256,
    batch_size: int = 32,
    weight_bits: int | None = 8,
    act_bits: int | None = 8,
    method: str = "minmax",
    modulate: bool = True,
    first_step: str = "fp",
    seed: int = 0,
    split: bool = False,
    progress: bool = True,
    *,
    weight_method: str | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    reservoir: int = DEFAULT_RESERVOIR,
    trust: bool = False,
    imported: QDiffusionImport | None = None,
    device: str | torch.device = "cpu",
    ema: bool = False,
    sampler: str | None = None,
    guidance_scale: float | None = None,
    conditioning: ContextSource | None = None,
) -> Calibration:
    """Calibrate static scales on full-precision DDIM trajectories and write them to `out`.

    `method` picks the activation scale search (minmax | mse | percentile); `weight_method`
    (default: 'mse' when method is 'mse', else 'minmax') the per-output-channel weight scales.
    `minmax` weights are not stored: the reference rounds symmetric absmax weights itself, so
    the file stays small. MoDiff files also hold first-step (warm-up) scales, so one file serves
    both --first-step modes; `first_step` records the intended one. `imported` (from
    `import_qdiffusion(modulate=True)`) supplies the integer weights instead of `weight_method`.
    `device` runs the trajectories there (statistics are moved to the CPU as they stream in).

    Latent-diffusion configs calibrate on the trajectories `sample` runs: LDM DDIM (or PLMS,
    the SD default) with `sampler`/`guidance_scale` defaulting to the paper settings, `steps`
    None meaning the config's default. SD needs `conditioning` (prompts through a text encoder,
    or `RandomContext` in tests); under guidance the statistics cover the cond+uncond batch,
    exactly what the MoDiff state will hold. `ema` loads the checkpoint's EMA weights.
    """
    started = time.perf_counter()
    check_method(method)
    weight_method = weight_method or ("mse" if method == "mse" else "minmax")
    check_method(weight_method, WEIGHT_METHODS)
    check_bits("weight_bits", weight_bits)
    check_bits("act_bits", act_bits)
    if first_step not in ("fp", "quantized"):
        raise ConfigError(f"first_step={first_step!r}: choose 'fp' or 'quantized'")
    if cali_n < 1 or batch_size < 1:
        raise ConfigError(f"cali_n ({cali_n}) and batch_size ({batch_size}) must be >= 1")
    model_cfg = config if isinstance(config, ModelConfig) else load_config(config)
    steps = steps or model_cfg.default_steps
    latent = _latent_sampling(model_cfg, steps, sampler, eta, guidance_scale, conditioning, seed)
    eta = latent[0].eta if latent else (eta or 0.0)  # None: the config's setting (ddim: 0)
    try:
        timesteps = model_cfg.timesteps(steps, skip_type)
        num_calls = latent[0].model_calls(len(timesteps)) if latent else len(timesteps)
        calibration_steps(num_calls, cali_st, modulate)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    model = load_unet(model_cfg, checkpoint, trust=trust, ema=ema).to(device)
    splits = imported.splits if imported is not None else model_splits(model, split)
    layers = {name: LayerScales() for name in quantizable_layers(model)}
    if act_bits is not None:
        with torch.no_grad():
            layers = measure_activations(
                model, model_cfg, timesteps, eta=eta, cali_st=cali_st, cali_n=cali_n, batch_size=batch_size,
                act_bits=act_bits, method=method, modulate=modulate, seed=seed, splits=splits,
                percentile=percentile, reservoir=reservoir, progress=progress,
                trajectory=latent[1] if latent else None, num_calls=num_calls,
            )
    weights_note: dict[str, Any] = {}
    if imported is not None:
        weight_method, weights_note = "qdiffusion", {"rounding": imported.rounding, **imported.report}
        for name, entry in imported.layers.items():
            layers[name].weight_codes, layers[name].weight_scale = entry.weight_codes, entry.weight_scale
    elif weight_bits is not None and weight_method == "mse":
        for name, (codes, scale) in mse_weights(model, weight_bits, splits).items():
            layers[name].weight_codes, layers[name].weight_scale = codes, scale
    seconds, peak = time.perf_counter() - started, peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else None
    log.info("calibration took %.1f s, peak RSS %.0f MB%s", seconds, peak,
             "" if gpu_peak is None else f", peak CUDA memory {gpu_peak:.0f} MB")
    meta = base_meta(
        model_cfg, checkpoint,
        kind="residual" if modulate else "raw", modulate=modulate, first_step=first_step, split=bool(splits),
        weight_bits=weight_bits, act_bits=act_bits, method=method, weight_method=weight_method,
        percentile=percentile if method == "percentile" else None, reservoir=reservoir,
        origin="calibration" if imported is None else "qdiffusion+calibration", weights=weights_note or None,
        schedule={"steps": steps, "skip_type": skip_type if not latent else "ldm-uniform",
                  "eta": eta, "cali_st": cali_st, "cali_n": cali_n,
                  "batch_size": batch_size, "seed": seed,
                  "calibration_steps": calibration_steps(num_calls, cali_st, modulate),
                  **({"sampler": latent[0].sampler, "guidance_scale": latent[0].guidance_scale} if latent else {})},
        report={"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1),
                "peak_cuda_mb": None if gpu_peak is None else round(gpu_peak, 1)},
    )
    return save_calibration(out, layers, meta)
