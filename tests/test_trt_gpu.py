"""GPU tests of the TensorRT backend (`-m gpu`): real TensorRT, real CUDA, the real exporter's graphs.

They export the embedded digits model the way users deploy it (W8A8 MoDiff, fp16, static
scales; plus a fixed-batch export and the plain `unet` graph), build the plans and sample. So
TensorRT's ONNX parser meets everything the exporter writes in fp16 (Casts, the fp32 timestep
region, Clip, attention MatMuls) and the runner runs on real streams and CUDA graphs.

Skipped with the reason when tensorrt is not importable or torch sees no CUDA device. Written
without a GPU and NOT run yet (see docs/tensorrt.md); `benchmarks/gpu_check.sh` runs them and
writes a JSON summary. With MODIFF_TRT_GPU_DIR set, exports and plans are kept there (the script
profiles them afterwards); with MODIFF_TRT_GPU_REPORT set, measured differences are appended
there as JSON lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.trt import digits_export, sample_recorded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed (GPU machine only)"
    ),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]

STEPS = 10
# TensorRT's fp16 kernels vs ONNX Runtime's CPU kernels on the same fp16 graph: different fp16
# arithmetic, amplified by the quantized trajectory. Chosen without a GPU run: loose enough for
# fp16 rounding, tight enough to catch a wrong binding or a stale state (those give O(1) errors).
MAX_REL_ERR = 5e-2


def _report(test: str, **values) -> None:
    path = os.environ.get("MODIFF_TRT_GPU_REPORT")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"test": test, **values}) + "\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """digits exports (MoDiff dynamic batch, MoDiff fixed batch 4, plain unet, MoDiff with the scaled
    fp16 state layout) with their plans."""
    from modiff_trt.engines.trt_build import build_engines

    keep = os.environ.get("MODIFF_TRT_GPU_DIR")
    root = Path(keep) if keep else tmp_path_factory.mktemp("gpu")
    cache = root / "timing.cache"
    dirs = {
        "modiff": digits_export(root / "modiff", root / "cal"),
        "fixed4": digits_export(root / "fixed4", root / "cal", batch_size=4),
        "plain": digits_export(root / "plain", root / "cal", modulate=False),
        "scaled": digits_export(root / "scaled", root / "cal", state_layout="scaled", state_dtype="float16"),
    }
    for key, export_dir in dirs.items():
        batches = {} if key == "fixed4" else {"min_batch": 1, "opt_batch": 4, "max_batch": 8}
        plans = build_engines(export_dir, timing_cache=cache, **batches)
        assert all(plan.with_name(plan.name + ".json").is_file() for plan in plans)
    return dirs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _trt(export_dir: Path, **kwargs):
    from modiff_trt.engines.trt_runtime import TensorRTRunner

    return TensorRTRunner(export_dir, **kwargs)


def _ort(export_dir: Path):
    from modiff_trt.engines.ort_backend import OrtRunner

    return OrtRunner(export_dir, provider="cpu")


@pytest.mark.parametrize("key", ["modiff", "plain", "scaled"])
def test_trt_samples_like_onnx_runtime_over_10_steps(built, key) -> None:
    export_dir = built[key]
    trt, x_trt = sample_recorded(_trt(export_dir), export_dir)
    ort, x_ort = sample_recorded(_ort(export_dir), export_dir)
    eps_errors = [_rel(a, b) for a, b in zip(trt.eps, ort.eps)]
    _report(f"trt_vs_ort_{key}", eps_rel_err=eps_errors, final_x_rel_err=_rel(x_trt, x_ort))
    assert len(eps_errors) == STEPS and all(torch.isfinite(e).all() for e in trt.eps)
    assert max(eps_errors) < MAX_REL_ERR and _rel(x_trt, x_ort) < MAX_REL_ERR


def test_cuda_graph_replay_equals_eager(built) -> None:
    export_dir = built["modiff"]
    eager, _ = sample_recorded(_trt(export_dir), export_dir)
    graphed = _trt(export_dir, cuda_graph=True)
    capture_pass, _ = sample_recorded(graphed, export_dir)  # eager run + capture of each arrangement
    replay_pass, _ = sample_recorded(graphed, export_dir)  # replays only
    bound = graphed._bound[3]
    _report("cuda_graph", captured=sorted(bound.graphs), eager_fallback=sorted(bound.eager))
    for run in (capture_pass, replay_pass):
        for k in range(STEPS):
            assert torch.equal(run.eps[k], eager.eps[k]), f"eps differs at step {k}"
            for name, value in eager.states[k].items():
                assert torch.equal(run.states[k][name], value), f"{name} differs after step {k}"


def test_short_last_batch_on_a_fixed_batch_export(built) -> None:
    export_dir = built["fixed4"]
    runner = _trt(export_dir)
    full, _ = sample_recorded(runner, export_dir, n=4)
    short, _ = sample_recorded(runner, export_dir, n=3)
    diffs = [float((a - b[:3]).abs().max()) for a, b in zip(short.eps, full.eps)]
    _report("short_last_batch", max_abs_diff=diffs)
    assert all(e.shape[0] == 3 for e in short.eps) and set(runner._bound) == {4}
    assert max(diffs) <= 1e-3  # same padded shape: TensorRT runs the same kernels on the same rows


def test_stale_sidecar_is_refused(built, tmp_path) -> None:
    from modiff_trt.errors import ArtifactError

    copy = tmp_path / "copy"
    shutil.copytree(built["modiff"], copy)
    side = copy / "step.plan.json"
    data = json.loads(side.read_text())
    side.write_text(json.dumps({**data, "tensorrt_version": "9.0.0"}))
    with pytest.raises(ArtifactError, match="built with TensorRT 9.0.0 .* Fix: rebuild"):
        _trt(copy)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_is_honoured(built, tmp_path) -> None:
    from modiff_trt.engines.sidecar import read_sidecar
    from modiff_trt.engines.trt_build import build_engines

    copy = tmp_path / "copy"
    shutil.copytree(built["modiff"], copy)
    build_engines(copy, device="cuda:1", min_batch=1, opt_batch=4, max_batch=8)
    assert read_sidecar(copy / "step.plan.json").gpu_name == torch.cuda.get_device_name(1)
    on_one, _ = sample_recorded(_trt(copy, device="cuda:1"), copy)
    assert all(torch.isfinite(e).all() for e in on_one.eps)
