"""`modiff-trt demo`: the whole pipeline on the embedded digits model, on any CPU.

Calibrates, exports and samples on the CPU in full precision, as plain Q-Diffusion and as
MoDiff, from the same noise, then writes a side-by-side grid and a report. The rows at 4-bit
activations show the project's central claim on a real trained model: plain quantization falls
apart, MoDiff does not; the NVFP4 row runs MoDiff's 4-bit residuals in NVFP4 where TensorRT
would (Linears; convolutions FP8/INT8, docs/formats.md); the g4 row has its own 4-bit residual
scales for each of 4 groups of steps (docs/export.md, "Step groups"). Sampling runs on the fastest CPU
backend installed (OpenVINO, else ONNX Runtime); the quantized rows are calibrated together
from one set of float trajectories.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from modiff_trt.atomic import atomic_directory, refuse_non_empty, replace_any
from modiff_trt.engines.factory import cpu_backend_for, fastest_cpu_backend, open_runner
from modiff_trt.machine import describe_machine
from modiff_trt.metrics import FID_MIN_IMAGES
from modiff_trt.models import load_config
from modiff_trt.models.builtin import builtin_checkpoint
from modiff_trt.pipeline import (
    calibration_files,
    export_config,
    ort_target,
    score_digits,
    timed_samples,
)
from modiff_trt.quant import QuantConfig
from modiff_trt.sampling.images import make_grid, to_uint8
from modiff_trt.sampling.sampler import make_sampler

log = logging.getLogger(__name__)

DEMO_ROWS: dict[str, QuantConfig] = {
    "fp32": QuantConfig(None, None, modulate=False),
    "qdiff-w8a8": QuantConfig(8, 8, modulate=False),
    "modiff-w8a8": QuantConfig(8, 8, modulate=True),
    "qdiff-w8a4": QuantConfig(8, 4, modulate=False),
    "modiff-w8a4": QuantConfig(8, 4, modulate=True),
    "modiff-w8a4-g4": QuantConfig(8, 4, modulate=True),
}
#: Opt-in (`demo --nvfp4`): OpenVINO cannot run NVFP4, and ONNX Runtime's standard-op emulation of
#: it takes about as long as all the default rows together, which would put the demo past a minute.
NVFP4_ROWS: dict[str, QuantConfig] = {"modiff-w8-nvfp4": QuantConfig(8, 4, modulate=True, act_format="nvfp4")}
#: Rows whose residual scales are calibrated per group of steps (`calibrate --step-groups G`).
DEMO_STEP_GROUPS: dict[str, int] = {"modiff-w8a4-g4": 4}


@dataclass
class DemoRow:
    name: str
    psnr_db: float | None
    digits_fid: float
    confidence: float
    seconds: float
    backend: str


@dataclass
class DemoReport:
    """What `report.json` holds: the rows (each with the backend that sampled it), the backend
    asked for, the machine, total time."""

    model: str
    num_images: int
    fid_reliable: bool  # digits FID needs >= FID_MIN_IMAGES images to rank configurations
    steps: int
    skip_type: str
    backend: str
    machine: str
    seconds: float
    rows: list[DemoRow]


def _labelled_grid(rows: dict[str, np.ndarray], per_row: int = 16, upscale: int = 4) -> Image.Image:
    """One line of `per_row` samples per config, its name written on the left."""
    strips = [make_grid(images[:per_row], columns=per_row) for images in rows.values()]
    label_w, h = 110, strips[0].shape[0] * upscale
    canvas = Image.new("L", (label_w + strips[0].shape[1] * upscale, h * len(strips)), 0)
    draw = ImageDraw.Draw(canvas)
    for i, (name, strip) in enumerate(zip(rows, strips, strict=True)):
        tile = Image.fromarray(strip[..., 0]).resize((strip.shape[1] * upscale, h), Image.NEAREST)
        canvas.paste(tile, (label_w, i * h))
        draw.text((4, i * h + h // 2 - 6), name, fill=255)
    return canvas


def run_demo(
    out: Path,
    num_images: int = 512,
    batch_size: int = 256,
    steps: int = 50,
    seed: int = 0,
    rows: dict[str, QuantConfig] = DEMO_ROWS,
    progress: bool = True,
    overwrite: bool = False,
    backend: str | None = None,
) -> DemoReport:
    """Run every row through calibrate -> export -> sampling on `backend` (default: the fastest
    CPU backend installed); write grid.png and report.json. Rows OpenVINO cannot run (FP8/NVFP4
    layers) sample on ONNX Runtime, and their row says so.

    Every row samples `steps` DDIM steps (quad) from the noise of `seed`; the calibration
    trajectories use seed + 1, so scales are never measured on the images they are scored on.
    Everything is written to a temporary sibling of `out`, renamed into place at the end: a
    non-empty `out` is refused unless `overwrite`, and an interrupted run leaves it as it was.
    """
    started = time.perf_counter()
    with atomic_directory(out, replace_any if overwrite else refuse_non_empty) as tmp:
        return _run_demo(
            tmp, num_images, batch_size, steps, seed, rows, progress, backend or fastest_cpu_backend(), started
        )


def _run_demo(
    out: Path,
    num_images: int,
    batch_size: int,
    steps: int,
    seed: int,
    rows: dict[str, QuantConfig],
    progress: bool,
    backend: str,
    started: float,
) -> DemoReport:
    model_cfg = load_config("digits")
    sampler = make_sampler(model_cfg, steps=steps, skip_type="quad")
    checkpoint = builtin_checkpoint("digits")
    results: list[DemoRow] = []
    samples: dict[str, np.ndarray] = {}
    reference = None
    with tempfile.TemporaryDirectory(prefix="modiff-demo-") as tmp:
        log.info(
            "calibrating %d configurations from one set of float trajectories",
            sum(quant.act_bits is not None for quant in rows.values()),
        )
        calibrations = calibration_files(
            model_cfg,
            checkpoint,
            list(rows.values()),
            sampler,
            Path(tmp),
            seed=seed + 1,
            step_groups=[min(DEMO_STEP_GROUPS.get(name, 1), max(1, steps - 1)) for name in rows],
        )
        for (name, quant), calibration in zip(rows.items(), calibrations, strict=True):
            export_dir = export_config(
                model_cfg, checkpoint, quant, calibration, out / "exports" / name, sampler, target=ort_target(quant)
            )
            row_backend = cpu_backend_for(export_dir, backend)
            log.info("%s: sample %d images with %s", name, num_images, row_backend)
            runner, _ = open_runner(export_dir, row_backend)
            x0, seconds = timed_samples(
                runner, model_cfg, num_images, batch_size, sampler, seed, progress=progress, description=name
            )
            reference = x0 if reference is None else reference
            scores = score_digits(x0, None if x0 is reference else reference)
            psnr = None if x0 is reference else round(scores["psnr_db"], 2)
            results.append(
                DemoRow(
                    name,
                    psnr,
                    round(scores["digits_fid"], 2),
                    round(scores["confidence"], 3),
                    round(seconds, 2),
                    row_backend,
                )
            )
            samples[name] = to_uint8(x0)
    _labelled_grid(samples).save(out / "grid.png")
    report = DemoReport(
        "digits (embedded)",
        num_images,
        num_images >= FID_MIN_IMAGES,
        sampler.steps,
        sampler.skip_type,
        backend,
        describe_machine(),
        round(time.perf_counter() - started, 1),
        results,
    )
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2))
    return report
