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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modiff_trt import __version__
from modiff_trt.calibrators.call_time import CallTimer
from modiff_trt.calibrators.collect import (
    DEFAULT_RESERVOIR,
    Collector,
    LayerStats,
    StreamStats,
    TrajectoryCollector,
    calibration_steps,
    input_channels,
    run_collectors,
)
from modiff_trt.calibrators.fileformat import Calibration, save_calibration
from modiff_trt.calibrators.recon_data import UNetInputCollector
from modiff_trt.calibrators.reconstruct import Reconstruction, ReconstructionOptions, reconstruct_weights
from modiff_trt.calibrators.search import (
    DEFAULT_PERCENTILE,
    WEIGHT_METHODS,
    activation_scale,
    check_format_method,
    check_method,
    mse_weight,
)
from modiff_trt.errors import ConfigError
from modiff_trt.export.manifest import sha256_file
from modiff_trt.memory import Estimate, calibration_estimate, check_fits
from modiff_trt.models import load_unet
from modiff_trt.models.config import ModelConfig
from modiff_trt.quant.config import QuantConfig
from modiff_trt.quant.formats import LayerFormat, layer_format
from modiff_trt.quant.layer import channel_groups
from modiff_trt.quant.model import layer_weight_bits, quantizable_layers, split_points
from modiff_trt.quant.scales import LayerScales, StepGroups
from modiff_trt.sampling.conditioning import ContextSource
from modiff_trt.sampling.run import model_device
from modiff_trt.sampling.sampler import Sampler

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class CalibrationOptions:
    """What to measure and how: the quantization it is for, the scale search, the trajectory budget.

    `weight_bits`/`act_bits`/`modulate`/`first_step`/`split` mean what they mean in `QuantConfig`
    (which validates them). `method` picks the activation scale search (minmax | mse |
    percentile); `weight_method` (default: 'mse' when method is 'mse', else 'minmax') the
    per-output-channel weight scales, rounded to nearest, or 'adaround': rounding learned by
    block reconstruction (`reconstruct.py`) with the `reconstruction` options, on the UNet
    inputs of the same trajectories at the same calibration steps. `cali_n` float trajectories are sampled in batches of
    `batch_size` from noise seeded by `seed`; statistics are taken at `cali_st` evenly spaced
    UNet calls. MoDiff files also hold first-step (warm-up) scales, so one file serves both
    `first_step` modes; `first_step` records the intended one. `act_format` (int | fp8 | nvfp4)
    stores each layer's scale in the format TensorRT runs that layer in
    (`quant.formats.layer_format`), and the format with it.
    """

    weight_bits: int | None = 8
    act_bits: int | None = 8
    modulate: bool = True
    first_step: str = "fp"
    split: bool = False
    method: str = "minmax"
    weight_method: str | None = None
    cali_st: int = 20
    cali_n: int = 256
    batch_size: int = 32
    seed: int = 0
    percentile: float = DEFAULT_PERCENTILE
    reservoir: int = DEFAULT_RESERVOIR
    step_groups: int | str = 1  # MoDiff residual scales per G groups of steps, or 'auto' (choose_step_groups)
    act_format: str = "int"
    reconstruction: ReconstructionOptions = ReconstructionOptions()  # weight_method 'adaround' only
    first_last_bits: int | None = 8  # weight bits of the UNet's input/output conv (QuantConfig); None: weight_bits

    def __post_init__(self) -> None:
        _ = self.quant  # QuantConfig validates the bits and first_step
        check_method(self.method)
        check_method(self.resolved_weight_method, WEIGHT_METHODS)
        check_format_method(self.act_format, self.method)
        if self.cali_n < 1 or self.batch_size < 1:
            raise ConfigError(f"cali_n ({self.cali_n}) and batch_size ({self.batch_size}) must be >= 1")
        if self.reconstructs and self.weight_bits is None:
            raise ConfigError("--weight-method adaround learns integer weights: give --weight-bits (not 0)")

    @property
    def reconstructs(self) -> bool:
        """Whether this file's weights come from block reconstruction (AdaRound)."""
        return self.resolved_weight_method == "adaround"

    @property
    def quant(self) -> QuantConfig:
        """The quantization these scales are for."""
        return QuantConfig(
            self.weight_bits,
            self.act_bits,
            modulate=self.modulate,
            first_step=self.first_step,
            split=self.split,
            act_format=self.act_format,
            first_last_bits=self.first_last_bits,
        )  # type: ignore[arg-type]

    @property
    def resolved_weight_method(self) -> str:
        return self.weight_method or ("mse" if self.method == "mse" else "minmax")


@dataclass
class ImportedWeights:
    """Integer weights found elsewhere (a released Q-Diffusion checkpoint) that calibration keeps.

    `layers` hold `weight_codes`/`weight_scale` (and, for a plain import, raw activation scales);
    `splits` are the split points read from the file; `origin` names the source ('qdiffusion')
    and `notes` (rounding, re-rounded channels, ...) go into the file's `weights` metadata.
    """

    layers: dict[str, LayerScales]
    splits: dict[str, int]
    origin: str
    notes: dict[str, Any] = field(default_factory=dict)


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
    sampler: Sampler,
    options: Sequence[CalibrationOptions],
    splits: dict[str, int],
    conditioning: ContextSource | None = None,
    progress: bool = True,
    step_groups: Sequence[StepGroups | None] | None = None,
    extra: Sequence[Collector] = (),
    trajectories: CalibrationOptions | None = None,
) -> tuple[list[tuple[dict[str, LayerScales], StepGroups | None]], CallTimer]:
    """Static activation scales per layer for each of `options` (residual + warm-up scales for
    MoDiff, raw for plain), all from ONE set of float trajectories: one collector per kind of
    statistic (raw or residual, and the step groups measured), the scale search per entry
    (bits, format and method only change the search).

    Steps index UNet calls, not sampler steps: PLMS calls the UNet once more than it has steps.
    `step_groups` (one per entry, default None) measures residual scales per group of steps
    (`LayerScales.act_groups`); with the entry's `step_groups == 'auto'` those are the finest
    candidates, merged by `choose_step_groups`. Returns per entry the scales and the step groups
    they hold (None: one group), and the timer of the UNet calls. `extra` collectors (the weight
    reconstruction's UNet inputs) ride along on the same trajectories; with no `options` only
    they are fed. `trajectories` (default: the first entry) sets cali_n, batch size and seed.
    This is the one place calibration samples trajectories.
    """
    groups = list(step_groups) if step_groups is not None else [None] * len(options)
    first = trajectories or options[0]
    n_batches = -(-first.cali_n // first.batch_size)
    collectors: dict[tuple, TrajectoryCollector] = {}
    keys = []
    for entry, requested in zip(options, groups, strict=True):
        key = (entry.modulate, None if requested is None else requested.bounds)
        keys.append(key)
        if key not in collectors:
            collectors[key] = _collector(model, sampler, entry, requested, n_batches, splits)
    timer = CallTimer(model, n_batches * sampler.model_calls(), unet_batch(first, sampler), model_device(model))
    run_collectors(
        [*collectors.values(), *extra, timer],
        sampler,
        model_cfg.sample_shape,
        first.cali_n,
        first.batch_size,
        first.seed,
        conditioning,
        progress,
    )
    log.info(
        "%d UNet calls took %.2f s each (%.2f s of this process's CPU time)",
        timer.timed,
        timer.seconds_per_call,
        timer.cpu_seconds_per_call,
    )
    scales = [
        _scales_of(model, entry, collectors[key].stats, requested)
        for entry, key, requested in zip(options, keys, groups, strict=True)
    ]
    return scales, timer


def unet_batch(trajectories: CalibrationOptions, sampler: Sampler) -> int:
    """Samples per UNet call: the trajectories of a batch, twice under guidance (cond + uncond)."""
    return min(trajectories.batch_size, trajectories.cali_n) * (2 if sampler.guided else 1)


def _collector(
    model: torch.nn.Module,
    sampler: Sampler,
    entry: CalibrationOptions,
    requested: StepGroups | None,
    n_batches: int,
    splits: dict[str, int],
) -> TrajectoryCollector:
    """The statistics collector of one kind (raw or residual, per step group) for `entry`."""
    steps = calibration_steps(sampler.model_calls(), entry.cali_st, entry.modulate)
    log.info(
        "calibrating %s at UNet calls %s of %d (%d trajectories)",
        "residuals" if entry.modulate else "raw inputs",
        steps,
        sampler.model_calls(),
        entry.cali_n,
    )
    if requested is not None:
        for g in range(requested.count):
            if not set(requested.steps_of(g)) & set(steps):
                raise ConfigError(
                    f"--cali-st {entry.cali_st} leaves step group {g} (steps {requested.steps_of(g)}) without a "
                    f"calibration step: raise --cali-st (up to {sampler.model_calls() - 1}) or use fewer groups"
                )
    return TrajectoryCollector(
        model,
        steps,
        entry.modulate,
        n_batches,
        splits,
        entry.reservoir,
        entry.seed,
        step_group=None if requested is None else requested.group_of,
    )


def _scales_of(
    model: torch.nn.Module,
    options: CalibrationOptions,
    stats: dict[str, LayerStats],
    step_groups: StepGroups | None,
) -> tuple[dict[str, LayerScales], StepGroups | None]:
    """One file's scales from the collected statistics (the scale search of `options`)."""
    fine = step_groups.count if step_groups is not None else 1
    if step_groups is not None and options.step_groups == "auto":
        step_groups = choose_step_groups(stats, step_groups)

    def scales(group_stats, fmt: LayerFormat):
        return [
            activation_scale(s.values(), s.absmax, fmt.bits, options.method, options.percentile, fmt.format)
            for s in group_stats
        ]

    out = {}
    for name, s in stats.items():
        fmt = layer_format(model.get_submodule(name), options.act_format, options.act_bits)
        if step_groups is None:
            measured = [s.act]
        else:  # the fine (measured) groups pooled per chosen group
            measured = [
                [pool(s.act_by_group[f][c] for f in members) for c in range(len(s.groups))]
                for members in _fine_members(fine, step_groups)
            ]
        per_group, absmax = [scales(g, fmt) for g in measured], [[c.absmax for c in g] for g in measured]
        grouped = step_groups is not None and step_groups.count > 1
        # A residual that is exactly 0 at every calibrated step (SD's to_k/to_v read the unchanging text
        # context) has no scale to find: such layers pass o_hat through instead of quantizing zeros.
        constant = options.modulate and all(g.count > 0 and g.absmax == 0.0 for step in s.act_by_group for g in step)
        out[name] = LayerScales(
            act=per_group[0],
            warmup=None if s.warmup is None else scales(s.warmup, fmt),
            act_groups=per_group if grouped else None,
            constant_input=constant,
            act_format=fmt.format,
            act_absmax=absmax[0],
            act_groups_absmax=absmax if grouped else None,
            warmup_absmax=None if s.warmup is None else [c.absmax for c in s.warmup],
        )
    return out, step_groups if step_groups is not None and step_groups.count > 1 else None


AUTO_MAX_GROUPS = 8
AUTO_SPREAD_BITS = 0.5  # a pooled group may lose at most this many bits to its largest member


def _fine_members(fine_count: int, chosen: StepGroups) -> list[list[int]]:
    """The fine (measured) groups each chosen group pools: contiguous runs of equal length."""
    per = fine_count // chosen.count
    return [list(range(g * per, (g + 1) * per)) for g in range(chosen.count)]


def pool(parts) -> StreamStats:
    """One statistic over several groups' values (exact absmax; the subsamples concatenated)."""
    parts = list(parts)
    merged = StreamStats(parts[0].per_chunk, max(p.absmax for p in parts), sum(p.count for p in parts))
    merged.chunks = [c for p in parts for c in p.chunks]
    return merged


def choose_step_groups(stats: dict[str, LayerStats], fine: StepGroups) -> StepGroups:
    """The fewest step groups (1, 2, 4, ... pooling the `fine` ones) whose residual absmax spread
    stays within AUTO_SPREAD_BITS: per candidate, the mean over layers of the largest
    log2(max/min absmax) among the fine groups one of its groups pools."""
    count = 1
    while True:
        per = fine.count // count
        spreads = []
        for s in stats.values():
            worst = 0.0
            for c in range(len(s.groups)):
                amax = np.array([max(s.act_by_group[f][c].absmax, 1e-12) for f in range(fine.count)])
                for g in range(count):
                    chunk = amax[g * per : (g + 1) * per]
                    worst = max(worst, float(np.log2(chunk.max() / chunk.min())))
            spreads.append(worst)
        spread = float(np.mean(spreads))
        log.info("step groups %d: mean residual scale spread within a group %.2f bits", count, spread)
        if spread <= AUTO_SPREAD_BITS or count * 2 > fine.count:
            chosen = StepGroups(fine.bounds[::per], fine.timesteps, fine.skip_type)
            log.info(
                "--step-groups auto picked %d group(s) (spread %.2f bits; limit %.2f)",
                chosen.count,
                spread,
                AUTO_SPREAD_BITS,
            )
            return chosen
        count *= 2


def requested_groups(options: CalibrationOptions, sampler: Sampler) -> StepGroups | None:
    """The step groups to measure (the finest candidates for 'auto'), or None for one group."""
    calls = sampler.model_calls()
    if options.step_groups == "auto":
        count = min(AUTO_MAX_GROUPS, calls - 1)
        count = 1 << (count.bit_length() - 1)  # a power of two, so 1, 2, 4, ... pool it evenly
    else:
        try:
            count = int(options.step_groups)
        except ValueError:
            raise ConfigError(f"--step-groups {options.step_groups!r}: give a number of groups or 'auto'") from None
        if count == 1:
            return None
    if not options.modulate or options.act_bits is None or sampler.name != "ddim":
        raise ConfigError(
            "--step-groups applies to MoDiff residual scales (--modulate, activation bits) with the "
            "ddim sampler: use --step-groups 1 here"
        )
    return StepGroups.even(count, sampler.timesteps(), sampler.skip_type)


def mse_weights(
    model: torch.nn.Module, bits: Mapping[str, int], splits: dict[str, int]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MSE-searched symmetric per-channel weights (codes, scale [O, groups]) for every layer, at
    its own bits (`layer_weight_bits`)."""
    out = {}
    for name, layer_bits in bits.items():
        module = model.get_submodule(name)
        weight = module.weight.detach().float().cpu()
        groups = channel_groups(input_channels(module), splits.get(name, 0))
        parts = [mse_weight(weight[:, g], layer_bits) for g in groups]
        out[name] = (torch.cat([c for c, _ in parts], dim=1), torch.stack([s for _, s in parts], dim=1))
    return out


def first_last_meta(model: torch.nn.Module, quant: QuantConfig) -> dict[str, Any]:
    """The file's record of its end layers: `first_last_bits` (null: every layer has `weight_bits`)
    and `layer_weight_bits`, the layers whose weight bits differ from `weight_bits`."""
    bits = layer_weight_bits(model, quant)
    return {
        "first_last_bits": quant.first_last_bits,
        "layer_weight_bits": {name: b for name, b in bits.items() if b != quant.weight_bits},
    }


def calibrate(
    model_cfg: ModelConfig,
    checkpoint: str | Path | None,
    out: str | Path,
    sampler: Sampler,
    options: CalibrationOptions = CalibrationOptions(),
    **kwargs: Any,
) -> Calibration:
    """Calibrate static scales on full-precision trajectories of `sampler` and write them to `out`.

    Calibrate with the sampler `sample` will run (`make_sampler(model_cfg, ...)`): MoDiff's
    residuals depend on the step spacing. Text-conditioned models need `conditioning` (prompts
    through a text encoder, or `RandomContext` in tests); under guidance the statistics cover
    the cond+uncond batch, exactly what the MoDiff state will hold. `minmax` weights are not
    stored (the reference rounds symmetric absmax weights itself, so the file stays small);
    `imported` supplies integer weights instead of a weight search. `device` runs the
    trajectories there (statistics move to the CPU as they stream in); `ema` loads the
    checkpoint's EMA weights. Keyword arguments: those of `calibrate_together`.
    """
    return calibrate_together(model_cfg, checkpoint, {out: options}, sampler, **kwargs)[0]


def _recon_key(options: CalibrationOptions) -> tuple:
    """Files whose reconstruction would be identical share one (the weights ignore activations)."""
    return (options.weight_bits, options.quant.end_weight_bits, options.reconstruction)


def reconstruct_entries(
    model: torch.nn.Module,
    inputs: UNetInputCollector | None,
    entries: Sequence[CalibrationOptions],
    splits: dict[str, int],
    progress: bool,
) -> dict[tuple, Reconstruction]:
    """AdaRound weights for each distinct (weight bits, reconstruction options) among `entries`."""
    out: dict[tuple, Reconstruction] = {}
    for entry in entries:
        key = _recon_key(entry)
        if key not in out:
            data = inputs.inputs(entry.reconstruction.samples)
            log.info("weight reconstruction (W%d) on %d calibration inputs", entry.weight_bits, len(data))
            bits = layer_weight_bits(model, entry.quant)
            out[key] = reconstruct_weights(model, data, bits, splits, entry.reconstruction, progress)
    return out


ADVICE = (
    "calibrate with a smaller --batch-size (the trajectories' inputs and activations grow with it), "
    "on a GPU (--device cuda), or on a machine with more memory"
)


def _memory_estimate(
    model_cfg: ModelConfig,
    checkpoint: str | Path | None,
    sampler: Sampler,
    measured: Sequence[CalibrationOptions],
    recon: Sequence[CalibrationOptions],
    device: str | torch.device,
) -> list[Estimate]:
    """The calibration's peak memory (`memory.calibration_estimate`) for these files' collectors."""
    first = (measured or recon)[0]
    # per layer: a reservoir per step group, plus the warm-up's for MoDiff, per kind of collector
    kinds = {(e.modulate, str(e.step_groups)) for e in measured}
    reservoirs = sum((AUTO_MAX_GROUPS if g == "auto" else int(g)) + m for m, g in kinds)
    return calibration_estimate(
        model_cfg,
        unet_batch(first, sampler),
        any(e.modulate for e in measured),
        device,
        stats_per_layer=4 * first.reservoir * reservoirs,
        checkpoint_bytes=0 if checkpoint is None else Path(checkpoint).stat().st_size,
        reconstruct=bool(recon),
    )


#: What the trajectories depend on: files calibrated together must agree on these.
TRAJECTORY_FIELDS = ("cali_st", "cali_n", "batch_size", "seed", "reservoir", "split")


def calibrate_together(
    model_cfg: ModelConfig,
    checkpoint: str | Path | None,
    targets: Mapping[str | Path, CalibrationOptions],
    sampler: Sampler,
    *,
    conditioning: ContextSource | None = None,
    imported: ImportedWeights | None = None,
    trust: bool = False,
    ema: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[Calibration]:
    """Write one calibration file per `targets` entry (path -> options) from one set of trajectories.

    Files that differ only in bits, format, method, weights, step groups or MoDiff vs plain come
    from the same float trajectories, so they are sampled once: each file is what `calibrate` writes for it alone,
    at a fraction of the time (the `demo` calibrates its four quantized rows this way).
    """
    started = time.perf_counter()
    entries = list(targets.items())
    first = entries[0][1]
    for out, entry in entries[1:]:
        differ = [f for f in TRAJECTORY_FIELDS if getattr(entry, f) != getattr(first, f)]
        if differ:
            raise ConfigError(
                f"{out}: calibrated together with {entries[0][0]}, but its {', '.join(differ)} "
                "differ: calibrate it separately"
            )
    if model_cfg.context_shape is not None and conditioning is None:
        raise ConfigError(
            f"{model_cfg.source} is text-conditioned: calibrate with prompts (--prompt/--from-file "
            "and --text-encoder DIR) or random context (--random-context, for tests)"
        )
    try:
        steps = {e.modulate: calibration_steps(sampler.model_calls(), e.cali_st, e.modulate) for _, e in entries}
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    requested = [requested_groups(e, sampler) for _, e in entries]
    measured = [(e, requested[i]) for i, (_, e) in enumerate(entries) if e.act_bits is not None]
    recon = [e for _, e in entries if e.reconstructs]
    if recon and imported is not None:
        raise ConfigError(
            f"--weight-method adaround learns weights, but the imported {imported.origin} file brings its own: "
            "drop one of them"
        )
    if measured or recon:
        check_fits(_memory_estimate(model_cfg, checkpoint, sampler, [e for e, _ in measured], recon, device), ADVICE)
    model = load_unet(model_cfg, checkpoint, trust=trust, ema=ema).to(device)
    splits = imported.splits if imported is not None else split_points(model, first.split)
    inputs = (
        UNetInputCollector(
            model,
            calibration_steps(sampler.model_calls(), first.cali_st, modulate=False),
            max(e.reconstruction.samples for e in recon),
            -(-first.cali_n // first.batch_size),
            first.seed,
        )
        if recon
        else None
    )
    extra = [] if inputs is None else [inputs]
    scales: Iterator[tuple[dict[str, LayerScales], StepGroups | None]] = iter(())
    timer = None
    if measured or extra:
        with torch.no_grad():
            measurements, timer = measure_activations(
                model,
                model_cfg,
                sampler,
                [e for e, _ in measured],
                splits,
                conditioning,
                progress,
                step_groups=[g for _, g in measured],
                extra=extra,
                trajectories=first,
            )
        scales = iter(measurements)
    reconstructed = reconstruct_entries(model, inputs, recon, splits, progress)
    seconds, peak = time.perf_counter() - started, peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else None
    log.info(
        "calibration took %.1f s, peak RSS %.0f MB%s",
        seconds,
        peak,
        "" if gpu_peak is None else f", peak CUDA memory {gpu_peak:.0f} MB",
    )
    written = []
    for out, options in entries:
        layers, groups = (
            ({n: LayerScales() for n in quantizable_layers(model)}, None) if options.act_bits is None else next(scales)
        )
        weight_method = options.resolved_weight_method
        if imported is not None:
            weight_method = imported.origin
            for name, entry in imported.layers.items():
                layers[name].weight_codes, layers[name].weight_scale = entry.weight_codes, entry.weight_scale
        elif options.weight_bits is not None and weight_method == "mse":
            for name, (codes, scale) in mse_weights(model, layer_weight_bits(model, options.quant), splits).items():
                layers[name].weight_codes, layers[name].weight_scale = codes, scale
        rebuilt = reconstructed.get(_recon_key(options)) if options.reconstructs else None
        if rebuilt is not None:
            for name, (codes, scale) in rebuilt.weights.items():
                layers[name].weight_codes, layers[name].weight_scale = codes, scale
        meta = base_meta(
            model_cfg,
            checkpoint,
            kind="residual" if options.modulate else "raw",
            modulate=options.modulate,
            first_step=options.first_step,
            split=bool(splits),
            weight_bits=options.weight_bits,
            **first_last_meta(model, options.quant),
            act_bits=options.act_bits,
            act_format=options.act_format,
            method=options.method,
            weight_method=weight_method,
            percentile=options.percentile if options.method == "percentile" else None,
            reservoir=options.reservoir,
            origin="calibration" if imported is None else f"{imported.origin}+calibration",
            weights=imported.notes if imported is not None else None,
            sampler=sampler.to_dict(),
            step_groups=None if groups is None else groups.to_dict(),
            reconstruction=None if rebuilt is None else rebuilt.meta(options.reconstruction),
            trajectories={
                "cali_st": options.cali_st,
                "cali_n": options.cali_n,
                "batch_size": options.batch_size,
                "seed": options.seed,
                "calibration_steps": steps[options.modulate],
            },
            report={
                "seconds": round(seconds, 2),
                "peak_rss_mb": round(peak, 1),
                "peak_cuda_mb": None if gpu_peak is None else round(gpu_peak, 1),
                "seconds_per_unet_call": None if timer is None else round(timer.seconds_per_call, 3),
                "cpu_seconds_per_unet_call": None if timer is None else round(timer.cpu_seconds_per_call, 3),
                "files_from_these_trajectories": len(entries),
            },
        )
        written.append(save_calibration(out, layers, meta))
    return written
