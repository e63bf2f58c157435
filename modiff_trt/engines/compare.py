"""`compare`: run several backends from the same noise and report per-step differences.

Per step it compares the sampler state x_t of each backend with the first one, using
Polygraphy's SimpleCompareFunc for the element-wise statistics, plus the norm-relative error
the tests use. Quantized graphs are expected to drift slightly: a float rounding difference
that moves one residual across a rounding boundary changes one integer code, and the change
propagates (see docs/export.md), so the table shows where drift starts and how it grows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modiff_trt.engines.factory import open_runner
from modiff_trt.export.schedule import manifest_betas
from modiff_trt.sampling import ddim_sample, ddim_timesteps, image_noise

log = logging.getLogger(__name__)


@dataclass
class StepDiff:
    step: int
    t: int
    backend: str
    rel_err: float  # ||x - x_ref|| / ||x_ref||
    max_abs: float
    mean_abs: float


def _polygraphy_stats(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    from polygraphy.comparator import IterationResult
    from polygraphy.logger import G_LOGGER

    try:
        from polygraphy.comparator import SimpleCompareFunc as compare_factory
    except ImportError:  # Polygraphy < 0.50
        from polygraphy.comparator import CompareFunc

        compare_factory = CompareFunc.simple
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    result = compare_factory(rtol=1.0, atol=1.0)(
        IterationResult({"x": reference}, runner_name="reference"), IterationResult({"x": other}, runner_name="other")
    )["x"]
    return float(result.max_absdiff), float(result.mean_absdiff)


def trajectory(runner, noise: torch.Tensor, timesteps: list[int], betas: torch.Tensor) -> list[torch.Tensor]:
    """x after every DDIM step (float32, CPU)."""
    xs: list[torch.Tensor] = []
    ddim_sample(runner, noise.to(getattr(runner, "device", "cpu")), timesteps, betas,
                callback=lambda i, t, x: xs.append(x.float().cpu().clone()))
    return xs


def compare_backends(
    export_dir: str | Path,
    backends: list[str],
    num_images: int = 4,
    steps: int = 10,
    skip_type: str = "quad",
    seed: int = 0,
    trust: bool = False,
) -> list[StepDiff]:
    """Per-step differences of `backends[1:]` against `backends[0]` over one DDIM trajectory."""
    runs = {}
    manifest = None
    for backend in backends:
        runner, manifest = open_runner(export_dir, backend, trust=trust)
        shape = manifest.model["sample_shape"]
        timesteps = ddim_timesteps(steps, skip_type)
        runs[backend] = trajectory(runner, image_noise(seed, range(num_images), shape), timesteps, manifest_betas(manifest))
    reference = runs[backends[0]]
    timesteps = list(reversed(ddim_timesteps(steps, skip_type)))
    rows = []
    for backend in backends[1:]:
        for k, (ref, got) in enumerate(zip(reference, runs[backend])):
            max_abs, mean_abs = _polygraphy_stats(ref.numpy(), got.numpy())
            rel = float((got.double() - ref.double()).norm() / ref.double().norm())
            rows.append(StepDiff(k, timesteps[k], backend, rel, max_abs, mean_abs))
    return rows
