"""End-to-end runs (calibrate -> export -> sample -> score) shared by `demo` and the benchmarks.

Each function is one stage with files on disk between stages, exactly what a user runs with
the CLI, so the demo and the quality benchmark measure the deployed path, not a shortcut.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from modiff_trt.calibrators import CalibrationOptions, calibrate_together
from modiff_trt.calibrators.reconstruct import ReconstructionOptions
from modiff_trt.engines.torch_backend import load_reference
from modiff_trt.export.exporter import export_model
from modiff_trt.models.config import ModelConfig
from modiff_trt.quant import QuantConfig
from modiff_trt.sampling.run import sample_batches
from modiff_trt.sampling.sampler import Sampler

log = logging.getLogger(__name__)


def calibration_files(
    model_cfg: ModelConfig,
    checkpoint: Path | None,
    quants: Sequence[QuantConfig],
    sampler: Sampler,
    workdir: Path,
    cali_st: int = 10,
    cali_n: int = 64,
    batch_size: int = 64,
    method: str = "minmax",
    seed: int = 1,
    step_groups: int | str | Sequence[int | str] = 1,
    weight_method: str | None | Sequence[str | None] = None,
    reconstruction: ReconstructionOptions | None = None,
) -> list[Path | None]:
    """The calibration file of each of `quants` in `workdir` (None when nothing needs scales or
    weights); `step_groups` and `weight_method` (None: follow `method`): one for all of them, or
    one per configuration. `reconstruction` sets the AdaRound options of 'adaround' files, which
    share one reconstruction per weight width.

    One file per (act bits and format, modulate, method, split, step groups); the missing ones
    are calibrated together from one set of float trajectories (per split: the split changes the
    statistics' channel groups). `seed` seeds the calibration noise: keep it apart from the
    sampling seed, so the scales are not measured on the very trajectories they are then scored on.
    """
    paths: list[Path | None] = []
    missing: dict[Path, CalibrationOptions] = {}
    per_quant = [step_groups] * len(quants) if isinstance(step_groups, int | str) else list(step_groups)
    methods = (
        [weight_method] * len(quants) if weight_method is None or isinstance(weight_method, str) else weight_method
    )
    for quant, quant_groups, quant_weights in zip(quants, per_quant, methods, strict=True):
        weights = quant_weights or ("mse" if method == "mse" else "minmax")
        carries_weights = quant.weight_bits is not None and weights != "minmax"
        if quant.act_bits is None and not carries_weights:
            paths.append(None)
            continue
        kind = "residual" if quant.modulate else "raw"
        grid = (
            "afp" if quant.act_bits is None else f"a{quant.act_bits}" if quant.act_format == "int" else quant.act_format
        )
        groups = "" if str(quant_groups) == "1" else f"-g{quant_groups}"
        tag = f"-w{quant.weight_bits}{weights}" if carries_weights else ""  # the file's integer weights
        if quant.end_weight_bits != quant.weight_bits:
            tag += f"-ends{quant.end_weight_bits}"  # the input/output conv's own weight bits
        path = workdir / f"{kind}-{grid}-{method}{tag}{'-split' if quant.split else ''}{groups}.cal.safetensors"
        paths.append(path)
        if not path.is_file():
            missing[path] = CalibrationOptions(
                weight_bits=quant.weight_bits,
                act_bits=quant.act_bits,
                modulate=quant.modulate,
                first_step=quant.first_step,
                split=quant.split,
                method=method,
                cali_st=cali_st,
                cali_n=cali_n,
                batch_size=batch_size,
                seed=seed,
                step_groups=quant_groups,
                act_format=quant.act_format,
                weight_method=quant_weights,
                reconstruction=reconstruction or ReconstructionOptions(),
                first_last_bits=quant.first_last_bits,
            )
    for split in sorted({options.split for options in missing.values()}):
        group = {path: options for path, options in missing.items() if options.split == split}
        calibrate_together(model_cfg, checkpoint, group, sampler, progress=False)
    return paths


def calibration_file(
    model_cfg: ModelConfig,
    checkpoint: Path | None,
    quant: QuantConfig,
    sampler: Sampler,
    workdir: Path,
    **options: Any,
) -> Path | None:
    """`calibration_files` for one configuration."""
    return calibration_files(model_cfg, checkpoint, [quant], sampler, workdir, **options)[0]


def export_config(
    model_cfg: ModelConfig,
    checkpoint: Path | None,
    quant: QuantConfig,
    calibration: Path | None,
    out: Path,
    sampler: Sampler | None = None,
    float_dtype: str = "float32",
    target: str = "trt",
) -> Path:
    """Export `quant` of the model to `out` (static scales from `calibration`, `sampler` in the manifest)."""
    static = QuantConfig(**{**quant.to_dict(), "act_scales": "static" if calibration else "dynamic"})
    _, float_model, qmodel = load_reference(model_cfg, checkpoint, static, calibration)
    export_model(
        float_model,
        qmodel,
        model_cfg,
        out,
        checkpoint=checkpoint,
        calibration=calibration,
        sampler=sampler,
        float_dtype=float_dtype,
        target=target,
    )
    return out


def ort_target(quant: QuantConfig) -> str:
    """The export target whose graphs ONNX Runtime runs: TensorRT's form, except that NVFP4 needs
    the ort-cpu target's emulation (ONNX Runtime has no FP4 kernels)."""
    return "ort-cpu" if quant.act_bits is not None and quant.act_format == "nvfp4" else "trt"


def timed_samples(
    runner,
    model_cfg: ModelConfig,
    num_images: int,
    batch_size: int,
    sampler: Sampler,
    seed: int = 0,
    progress: bool = False,
    description: str = "sampling",
) -> tuple[torch.Tensor, float]:
    """Final samples from per-image noise (seed, i) and the wall-clock seconds they took."""
    start = time.perf_counter()
    x0 = sample_batches(
        sampler,
        runner,
        model_cfg.sample_shape,
        num_images,
        batch_size,
        seed,
        progress=progress,
        description=description,
    )
    return x0, time.perf_counter() - start


def score_digits(x0: torch.Tensor, reference: torch.Tensor | None) -> dict[str, float]:
    """PSNR vs the full-precision samples from the same noise, digits FID, classifier confidence."""
    from modiff_trt.metrics import digits_confidence, digits_fid, psnr_db

    confidence, _ = digits_confidence(x0)
    return {
        "psnr_db": float("inf") if reference is None else psnr_db(x0, reference),
        "digits_fid": digits_fid(x0),
        "confidence": confidence,
    }
