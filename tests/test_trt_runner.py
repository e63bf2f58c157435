"""The shared stateful runner and the whole `trt` backend on the CPU, through a runtime double.

The double (tests/helpers/trt_double.py) is NOT TensorRT: its engines run the same ONNX graphs
with ONNX Runtime on the memory the runner binds. Passing here shows that modiff-trt builds,
binds, schedules and replays correctly against the TensorRT API as written; whether TensorRT
itself parses and computes the graphs is only shown by `pytest -m gpu` (test_trt_gpu.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from modiff_trt.engines import trt_build
from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.engines.runner import PLAIN, STEP_0TO1, STEP_1TO0, WARMUP, Arrangements
from modiff_trt.engines.sidecar import read_sidecar
from modiff_trt.errors import ArtifactError, ConfigError, ModiffError
from modiff_trt.export.manifest import load_manifest, sha256_file
from tests.helpers.trt import Recorder, digits_export, make_tiny_export, sample_recorded
from tests.helpers.trt_double import install_double

STEPS, THREADS = 10, 2


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory) -> dict[str, Path]:
    """The embedded digits model exported as the GPU tests build it: W8A8 MoDiff, fp16, static scales
    (dynamic batch and fixed batch 4), and the plain unet graph."""
    root = tmp_path_factory.mktemp("digits")
    return {
        "modiff": digits_export(root / "modiff", root / "cal"),
        "fixed4": digits_export(root / "fixed4", root / "cal", batch_size=4),
        "plain": digits_export(root / "plain", root / "cal", modulate=False),
        "groups": digits_export(root / "groups", root / "cal", step_groups=3),
        "scaled": digits_export(root / "scaled", root / "cal", state_layout="scaled", state_dtype="float16"),
    }


def _build(export_dir: Path, monkeypatch, **kwargs):
    """Build plans with the double; returns the double (installed as `tensorrt`)."""
    double = install_double(monkeypatch, threads=THREADS, **kwargs.pop("double", {}))
    trt_build.build_engines(export_dir, **kwargs)
    return double


def _runner(export_dir: Path, double, **kwargs):
    from modiff_trt.engines.trt_runtime import TensorRTRunner

    return TensorRTRunner(export_dir, launcher=double.host_launcher(), **kwargs)


def _trajectory(runner, export_dir: Path, n: int = 3):
    return sample_recorded(runner, export_dir, n, STEPS)[0]


def _assert_same(got: Recorder, want: Recorder) -> None:
    assert len(got.eps) == len(want.eps) == STEPS
    for k, (a, b) in enumerate(zip(got.eps, want.eps, strict=True)):
        assert torch.equal(a, b), f"eps differs at call {k}"
    for k, (a, b) in enumerate(zip(got.states, want.states, strict=True)):
        assert a.keys() == b.keys(), f"state names differ after call {k}"
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} differs after call {k}"


# -- the one place that decides warm-up vs step --------------------------------------------------


def test_arrangements_warm_up_then_ping_pong() -> None:
    modulated = Arrangements(True)
    assert [modulated.for_call(k) for k in range(5)] == [WARMUP, STEP_0TO1, STEP_1TO0, STEP_0TO1, STEP_1TO0]
    assert [a.name for a in modulated.all] == ["warmup", "step_0to1", "step_1to0"]
    assert (WARMUP.read, WARMUP.write, STEP_0TO1.read, STEP_0TO1.write) == (None, 0, 0, 1)
    plain = Arrangements(False)
    assert {plain.for_call(k) for k in range(4)} == {PLAIN} and plain.all == (PLAIN,)
    with pytest.raises(ValueError):
        modulated.for_call(-1)


# -- validation and padding (every backend) ------------------------------------------------------


def test_runner_validates_x_t_context_and_the_trajectory_batch(tmp_path: Path) -> None:
    make_tiny_export(tmp_path / "dyn")
    runner = OrtRunner(tmp_path / "dyn", provider="cpu")
    x, t = torch.randn(2, 4, 4, 4), torch.full((2,), 500.0)
    with pytest.raises(ModiffError, match=r"exported for \[batch, 4, 4, 4\]"):
        runner(torch.randn(2, 4, 4, 5), t)
    with pytest.raises(ModiffError, match=r"t must have shape \[2\]"):
        runner(x, t[:1])
    with pytest.raises(ModiffError, match="takes no text context"):
        runner(x, t, torch.zeros(2, 7, 8))
    with pytest.raises(ModiffError, match="NaN or Inf"):
        runner(x * float("nan"), t)
    with pytest.raises(ModiffError, match="run the warm-up call first"):
        runner.state()
    runner(x, t)
    with pytest.raises(ModiffError, match="batch size changed from 2 to 1 inside a trajectory"):
        runner(x[:1], t[:1])
    runner.reset_state()
    runner(x[:1], t[:1])  # a new trajectory may use another batch
    make_tiny_export(tmp_path / "fixed", batch_size=2)
    with pytest.raises(ModiffError, match="exceeds .* exported for batch 2"):
        OrtRunner(tmp_path / "fixed", provider="cpu")(torch.randn(3, 4, 4, 4), torch.full((3,), 1.0))


def test_short_last_batch_is_padded_on_a_fixed_batch_trt_export(digits_dirs, monkeypatch) -> None:
    """Bug 4: the TensorRT runner crashed on the last, shorter batch of a fixed-batch export."""
    export_dir = digits_dirs["fixed4"]
    double = _build(export_dir, monkeypatch)
    trt = _runner(export_dir, double)
    full = _trajectory(trt, export_dir, n=4)
    short = _trajectory(_runner(export_dir, double), export_dir, n=3)
    for a, b in zip(short.eps, full.eps, strict=True):
        assert a.shape[0] == 3 and torch.equal(a, b[:3])  # padding rows are per-sample: no effect
    assert set(trt._bound) == {4}  # the engines only ever saw their fixed batch


# -- the TensorRT runner end to end on the double -----------------------------------------------


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trt_runner_on_the_double_equals_ort_over_a_10_step_trajectory(digits_dirs, monkeypatch, cuda_graph) -> None:
    """eps and every a_hat/o_hat after every call are bit-identical to `--backend ort`: same graphs,
    same ONNX Runtime, same batch and threads; so bindings by name, ping-pong and (with CUDA
    graphs) capture/replay are right. Says nothing about TensorRT's numerics."""
    export_dir = digits_dirs["modiff"]
    double = _build(export_dir, monkeypatch, min_batch=1, opt_batch=3, max_batch=8)
    want = _trajectory(OrtRunner(export_dir, provider="cpu", threads=THREADS), export_dir)
    runner = _runner(export_dir, double, cuda_graph=cuda_graph)
    _assert_same(_trajectory(runner, export_dir), want)
    executions = double.state.executions
    _assert_same(_trajectory(runner, export_dir), want)  # second trajectory: contexts (and graphs) reused
    assert double.state.executions - executions == STEPS  # one launch per call, captured or eager
    assert len(want.states[0]) == sum(len(layer.state_kinds) for layer in load_manifest(export_dir).layers)


def test_step_scale_ratio_is_filled_per_step_group_like_ort(digits_dirs, monkeypatch) -> None:
    """An export with 3 step groups: the trt runner binds the one `step_scale_ratio` buffer (not
    batched) and refills it per group exactly as the ort runner does (bit-identical eps and state)."""
    export_dir = digits_dirs["groups"]
    assert load_manifest(export_dir).step_groups.count == 3
    double = _build(export_dir, monkeypatch, min_batch=1, opt_batch=3, max_batch=8)
    want = _trajectory(OrtRunner(export_dir, provider="cpu", threads=THREADS), export_dir)
    _assert_same(_trajectory(_runner(export_dir, double), export_dir), want)


def test_scaled_state_layout_on_the_double_equals_ort(digits_dirs, monkeypatch) -> None:
    """state_layout 'scaled' (fp16 A = a_hat / s, fp16 o_hat): the runner binds and ping-pongs the
    same fp16 buffers, the layout living inside the graphs; bit-identical to ORT."""
    export_dir = digits_dirs["scaled"]
    assert load_manifest(export_dir).export.state_layout == "scaled"
    double = _build(export_dir, monkeypatch, min_batch=1, opt_batch=3, max_batch=8)
    want = _trajectory(OrtRunner(export_dir, provider="cpu", threads=THREADS), export_dir)
    _assert_same(_trajectory(_runner(export_dir, double, cuda_graph=True), export_dir), want)


def test_plain_unet_graph_on_the_double_equals_ort(digits_dirs, monkeypatch) -> None:
    export_dir = digits_dirs["plain"]
    double = _build(export_dir, monkeypatch)
    assert [p.name for p in export_dir.glob("*.plan")] == ["unet.plan"]
    want = _trajectory(OrtRunner(export_dir, provider="cpu", threads=THREADS), export_dir)
    _assert_same(_trajectory(_runner(export_dir, double, cuda_graph=True), export_dir), want)


def test_failed_cuda_graph_capture_falls_back_to_eager(digits_dirs, monkeypatch, caplog) -> None:
    """Bug 1: a capture whose execute_async_v3 returns False was kept and replayed, leaving eps and
    the state stale. Now the capture is discarded and the arrangement runs eagerly, with a warning."""
    export_dir = digits_dirs["modiff"]
    double = _build(export_dir, monkeypatch)
    eager = _trajectory(_runner(export_dir, double), export_dir)
    double.state.capture_fails = {"step"}
    runner = _runner(export_dir, double, cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="modiff_trt.engines.trt_runtime"):
        got = _trajectory(runner, export_dir)
    _assert_same(got, eager)
    bound = runner._bound[3]
    assert set(bound.graphs) == {"warmup"} and bound.eager == {"step_0to1", "step_1to0"}
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 2


def test_contexts_of_other_batch_sizes_are_released(digits_dirs, monkeypatch) -> None:
    export_dir = digits_dirs["modiff"]
    double = _build(export_dir, monkeypatch)
    runner = _runner(export_dir, double)
    _trajectory(runner, export_dir, n=4)
    assert set(runner._bound) == {4}
    _trajectory(runner, export_dir, n=2)
    assert set(runner._bound) == {2}


def test_non_current_device_is_honoured_by_build_and_runtime(digits_dirs, monkeypatch) -> None:
    """Bug 5: TensorRT works on the *current* CUDA device. Building and running on cuda:1 while
    device 0 is current must make device 1 current around every TensorRT call, and the sidecar
    must name the GPU that built the plan."""
    export_dir = digits_dirs["modiff"]
    double = _build(export_dir, monkeypatch, device="cuda:1", double={"gpus": ("GPU zero", "GPU one")})
    assert torch.cuda.current_device() == 0
    assert read_sidecar(export_dir / "step.plan.json").gpu_name == "GPU one"
    assert {device for event, _, device in double.state.events if event == "build"} == {1}
    double.state.events.clear()
    runner = _runner(export_dir, double, device="cuda:1")
    _trajectory(runner, export_dir, n=2)
    seen = {(event, device) for event, _, device in double.state.events}
    for event in ("deserialize", "create_execution_context", "set_tensor_address", "execute"):
        assert (event, 1) in seen and (event, 0) not in seen, event
    with pytest.raises(ArtifactError, match="built and tuned on a GPU one but this GPU is a GPU zero"):
        _runner(export_dir, double, device="cuda:0")


# -- engines, sidecars, builder options ------------------------------------------------------------


def test_stale_or_foreign_plans_are_refused(digits_dirs, monkeypatch, tmp_path) -> None:
    export_dir = digits_dirs["modiff"]
    _build(export_dir, monkeypatch)
    newer = install_double(monkeypatch, version="10.14.1.48")
    with pytest.raises(ArtifactError, match="built with TensorRT 10.13.0.35 but TensorRT 10.14.1.48"):
        _runner(export_dir, newer)
    side = export_dir / "warmup.plan.json"
    data = json.loads(side.read_text())
    side.write_text(json.dumps({**data, "onnx_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="different warmup.onnx"):
        _runner(export_dir, install_double(monkeypatch))


def test_a_plan_built_from_another_manifest_is_refused_naming_the_rebuild(digits_dirs, monkeypatch, tmp_path) -> None:
    """The sidecar records manifest.json's sha256: an edit after the build (batch, layers, scales) makes
    the plan bind other state or shapes than the manifest now describes."""
    import shutil

    export_dir = tmp_path / "copy"
    shutil.copytree(digits_dirs["modiff"], export_dir)
    double = _build(export_dir, monkeypatch)
    manifest = export_dir / "manifest.json"
    assert read_sidecar(export_dir / "step.plan.json").manifest_sha256 == sha256_file(manifest)
    _runner(export_dir, double)  # as built: accepted
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "tool_version": "edited"}))
    with pytest.raises(ArtifactError, match=r"built from another manifest.json .* Fix: rebuild .*modiff-trt build"):
        _runner(export_dir, double)
    for side in export_dir.glob("*.plan.json"):  # version 1 sidecars vouch for the graph only, and still load
        data = {k: v for k, v in json.loads(side.read_text()).items() if k != "manifest_sha256"}
        side.write_text(json.dumps({**data, "version": 1}))
    _runner(export_dir, double)


def test_version_compatible_plans_load_on_the_next_major(digits_dirs, monkeypatch) -> None:
    export_dir = digits_dirs["modiff"]
    _build(export_dir, monkeypatch, version_compatible=True)
    assert read_sidecar(export_dir / "step.plan.json").version_compatible
    runner = _runner(export_dir, install_double(monkeypatch, version="11.0.0.1"))
    assert runner._runtime.engine_host_code_allowed  # the double returns no engine without it
    _trajectory(runner, export_dir, n=1)


def test_builder_flags_profile_and_timing_cache(digits_dirs, monkeypatch, tmp_path, caplog) -> None:
    export_dir = digits_dirs["modiff"]
    cache = tmp_path / "timing.cache"
    _build(export_dir, monkeypatch, timing_cache=cache)
    plan = json.loads((export_dir / "step.plan").read_text())
    assert "TF32" not in plan["flags"] and plan["profiling_verbosity"] == "LAYER_NAMES_ONLY"
    side = read_sidecar(export_dir / "step.plan.json")
    assert side.builder["tf32"] is False and side.builder["profiling_verbosity"] == "layer_names_only"
    assert cache.read_bytes() == b"double-timing-cache"
    # A cache TensorRT refuses (another GPU or release): warn, build with a fresh one, replace it.
    install_double(monkeypatch).state.refuse_timing_cache = True
    with caplog.at_level(logging.WARNING, logger="modiff_trt.engines.trt_build"):
        trt_build.build_engines(export_dir, timing_cache=cache, tf32=True, detailed_profile=True)
    assert any("refused the timing cache" in r.getMessage() for r in caplog.records)
    plan = json.loads((export_dir / "step.plan").read_text())
    assert "TF32" in plan["flags"] and plan["profiling_verbosity"] == "DETAILED"
    assert read_sidecar(export_dir / "step.plan.json").builder["profiling_verbosity"] == "detailed"


def test_builder_and_runtime_check_return_values(digits_dirs, monkeypatch) -> None:
    export_dir = digits_dirs["modiff"]
    double = install_double(monkeypatch)
    double.state.refuse_profiles = True
    with pytest.raises(ArtifactError, match="rejected the optimization profile"):
        trt_build.build_engines(export_dir)
    double.state.refuse_profiles, double.state.no_timing_cache = False, True
    trt_build.build_engines(export_dir, timing_cache=export_dir / "cache")  # nothing to serialise: no crash
    assert not (export_dir / "cache").exists()
    double.state.refuse_addresses = {"o_hat_in.temb.dense.0"}
    with pytest.raises(ModiffError, match="rejected the buffer address of o_hat_in.temb.dense.0 for step_0to1"):
        _trajectory(_runner(export_dir, double), export_dir, n=1)


def test_build_refuses_an_ort_cpu_export_before_importing_tensorrt(tmp_path, monkeypatch) -> None:
    manifest = make_tiny_export(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["export"]["target"] = "ort-cpu"
    (tmp_path / "manifest.json").write_text(json.dumps(data))

    def no_tensorrt():
        raise AssertionError("TensorRT was imported")

    monkeypatch.setattr(trt_build, "import_tensorrt", no_tensorrt)
    with pytest.raises(ConfigError, match="target 'ort-cpu'.*--target trt"):
        trt_build.build_engines(tmp_path)
    assert manifest.graphs  # the export itself is fine for ONNX Runtime
