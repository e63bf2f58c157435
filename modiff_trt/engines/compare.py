"""`compare`: run several backends from the same noise and report per-step differences.

Every backend runs the export's sampler (`manifest.sampling`: DDIM, LDM DDIM or PLMS with
guidance), with the step count and other settings overridable. Text-conditioned exports get
random per-image context unless a context source is given: the comparison is about the
runtimes agreeing, and any context exercises the cross-attention path. Per step it compares
the sampler state x_t of each backend with the first one, using
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

from modiff_trt.devices import AUTO, DEVICE_BACKENDS
from modiff_trt.engines.factory import open_runner
from modiff_trt.sampling.conditioning import ContextSource, RandomContext
from modiff_trt.sampling.noise import image_noise
from modiff_trt.sampling.sampler import Sampler, make_sampler

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


def trajectory(
    runner, sampler: Sampler, noise: torch.Tensor, conditioning: ContextSource | None = None
) -> list[tuple[int, torch.Tensor]]:
    """(t, x) after every sampler step (x float32, CPU), from `noise` (images 0..n-1)."""
    steps: list[tuple[int, torch.Tensor]] = []
    sampler.trajectory(
        runner,
        noise.to(getattr(runner, "device", "cpu")),
        conditioning=conditioning,
        callback=lambda step, t, x: steps.append((t, x.float().cpu().clone())),
    )
    return steps


def compare_backends(
    export_dir: str | Path,
    backends: list[str],
    num_images: int = 4,
    seed: int = 0,
    trust: bool = False,
    conditioning: ContextSource | None = None,
    device: str = AUTO,
    **sampler_options,
) -> list[StepDiff]:
    """Per-step differences of `backends[1:]` against `backends[0]` over one trajectory.

    `device` places the torch and trt backends (`devices.runner_device`); the others keep theirs.
    `sampler_options` (steps, skip_type, eta, sampler, guidance_scale) override the export's
    sampler, as `make_sampler` takes them.
    """
    runs = {}
    for backend in backends:
        placed = device if backend in DEVICE_BACKENDS else AUTO
        runner, manifest = open_runner(export_dir, backend, trust=trust, device=placed)
        sampler = make_sampler(manifest.sampling, **sampler_options)
        context_shape = manifest.model.context_shape
        if context_shape is not None and conditioning is None:
            log.info("%s takes text context: comparing with random context (seed %d)", export_dir, seed)
            conditioning = RandomContext(context_shape, seed)
        noise = image_noise(seed, range(num_images), manifest.model.sample_shape)
        runs[backend] = trajectory(runner, sampler, noise, conditioning)
    reference = runs[backends[0]]
    rows = []
    for backend in backends[1:]:
        for k, ((t, ref), (_, got)) in enumerate(zip(reference, runs[backend], strict=True)):
            max_abs, mean_abs = _polygraphy_stats(ref.numpy(), got.numpy())
            rel = float((got.double() - ref.double()).norm() / ref.double().norm())
            rows.append(StepDiff(k, t, backend, rel, max_abs, mean_abs))
    return rows
