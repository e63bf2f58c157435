"""CPU tests of the TensorRT layer: everything that does not need TensorRT or a GPU.

Nothing here runs TensorRT; the GPU tests are in test_trt_gpu.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modiff_trt.engines import trt_build, trtexec
from modiff_trt.engines.sidecar import (
    EngineSidecar,
    check_sidecar,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from modiff_trt.engines.state_buffers import ALIGNMENT, StateBuffers, align_up, layout_from_manifest, state_layout
from modiff_trt.errors import ArtifactError, BackendUnavailableError, ConfigError, ModiffError
from modiff_trt.export.manifest import LayerSpec, load_manifest
from tests.helpers.trt import LAYERS, make_tiny_export

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


# -- trtexec command ------------------------------------------------------------------------


def test_trtexec_command_trt10_has_version_specific_flags(tmp_path: Path) -> None:
    cmd = trtexec.build_trtexec_command(
        tmp_path / "step.plan",
        10,
        {"x": [4, 3, 32, 32], "t": [4], "a_hat_in.conv": [4, 8, 2, 2]},
        load_inputs={"x": tmp_path / "x.bin", "a_hat_in.conv": tmp_path / "a.bin"},
        per_layer=True,
        profile_json=tmp_path / "p.json",
        layer_info_json=tmp_path / "l.json",
    )
    assert cmd[0] == "trtexec"
    assert f"--loadEngine={tmp_path / 'step.plan'}" in cmd
    assert "--shapes=x:4x3x32x32,t:4,a_hat_in.conv:4x8x2x2" in cmd
    assert f"--loadInputs=x:{tmp_path / 'x.bin'},a_hat_in.conv:{tmp_path / 'a.bin'}" in cmd
    assert "--useCudaGraph" in cmd and "--noDataTransfers" in cmd
    for flag in ("--dumpProfile", "--separateProfileRun", "--profilingVerbosity=detailed"):
        assert flag in cmd
    assert f"--exportProfile={tmp_path / 'p.json'}" in cmd
    assert f"--exportLayerInfo={tmp_path / 'l.json'}" in cmd
    assert "--stronglyTyped" not in cmd  # only meaningful when building from ONNX
    assert all(isinstance(a, str) for a in cmd)


def test_trtexec_command_trt11_drops_noop_flags(tmp_path: Path) -> None:
    cmd = trtexec.build_trtexec_command(tmp_path / "m.onnx", 11, {"x": [1, 4]})
    assert cmd[:2] == ["trtexec", f"--onnx={tmp_path / 'm.onnx'}"]
    for flag in ("--stronglyTyped", "--useCudaGraph", "--noDataTransfers", "--int8", "--fp16", "--dumpProfile"):
        assert flag not in cmd


def test_trtexec_command_onnx_trt10_is_strongly_typed(tmp_path: Path) -> None:
    cmd = trtexec.build_trtexec_command(tmp_path / "m.onnx", 10, {}, trtexec="/opt/trt/bin/trtexec")
    assert cmd[0] == "/opt/trt/bin/trtexec" and "--stronglyTyped" in cmd
    assert not any(a.startswith("--shapes") for a in cmd)


def test_shape_spec_quotes_names_with_separators() -> None:
    assert trtexec.shape_spec({"in:0": [2, 3]}) == "'in:0':2x3"


# -- trtexec output parsing -----------------------------------------------------------------

SUMMARY_TEXT = """\
[11/22/2026-05:00:00] [I] Some build log line: not a metric
[11/22/2026-05:00:01] [I] === Performance summary ===
[11/22/2026-05:00:01] [I] Throughput: 1091.43 qps
[11/22/2026-05:00:01] [I] Latency: min = 0.905273 ms, max = 1.41406 ms, mean = 0.91449 ms, median = 0.911377 ms, percentile(90%) = 0.918457 ms, percentile(95%) = 0.921387 ms, percentile(99%) = 0.933838 ms
[11/22/2026-05:00:01] [I] Enqueue Time: min = 0.00292969 ms, max = 0.0273438 ms, mean = 0.00368 ms, median = 0.00341797 ms, percentile(90%) = 0.00439453 ms, percentile(95%) = 0.00488281 ms, percentile(99%) = 0.00683594 ms
[11/22/2026-05:00:01] [I] H2D Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(90%) = 0 ms, percentile(95%) = 0 ms, percentile(99%) = 0 ms
[11/22/2026-05:00:01] [I] GPU Compute Time: min = 0.905273 ms, max = 1.41406 ms, mean = 0.91449 ms, median = 0.911377 ms, percentile(90%) = 0.918457 ms, percentile(95%) = 0.921387 ms, percentile(99%) = 0.933838 ms
[11/22/2026-05:00:01] [I] D2H Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(90%) = 0 ms, percentile(95%) = 0 ms, percentile(99%) = 0 ms
[11/22/2026-05:00:01] [I] Total Host Walltime: 3.00246 s
[11/22/2026-05:00:01] [I] Total GPU Compute Time: 2.98393 s
[11/22/2026-05:00:01] [I] Explanations of the performance metrics are printed in the verbose logs.
&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec --loadEngine=step.plan
"""


def test_parse_performance_summary() -> None:
    summary = trtexec.parse_performance_summary(SUMMARY_TEXT)
    assert summary.throughput_qps == pytest.approx(1091.43)
    assert set(summary.metrics) == {"Latency", "Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency"}
    gpu = summary.gpu_compute
    assert gpu is not None
    assert gpu.median == pytest.approx(0.911377)
    assert gpu.min == pytest.approx(0.905273) and gpu.max == pytest.approx(1.41406)
    assert gpu.percentiles == {
        "90": pytest.approx(0.918457),
        "95": pytest.approx(0.921387),
        "99": pytest.approx(0.933838),
    }
    assert summary.metrics["Enqueue Time"].mean == pytest.approx(0.00368)
    assert summary.totals == {
        "Total Host Walltime": pytest.approx(3.00246),
        "Total GPU Compute Time": pytest.approx(2.98393),
    }
    json.dumps(summary.to_dict())  # JSON-serialisable


def test_parse_performance_summary_missing_block() -> None:
    with pytest.raises(ModiffError, match="Performance summary"):
        trtexec.parse_performance_summary("[E] Error[1]: engine deserialization failed\n")


def test_summarize_layer_profile(tmp_path: Path) -> None:
    data = [{"count": 100}] + [
        {"name": f"layer{i}", "timeMs": 10.0 * i, "averageMs": 0.1 * i, "medianMs": 0.1 * i, "percentage": float(i)}
        for i in range(1, 8)
    ]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    summary = trtexec.summarize_layer_profile(path, top=3)
    assert summary.runs == 100
    assert [layer.name for layer in summary.layers] == ["layer7", "layer6", "layer5"]
    assert summary.total_average_ms == pytest.approx(sum(0.1 * i for i in range(1, 8)))
    with pytest.raises(ArtifactError):
        trtexec.summarize_layer_profile(tmp_path / "missing.json")


# -- state buffers --------------------------------------------------------------------------


def _layers() -> list[LayerSpec]:
    # Odd sizes so that unaligned packing would be visible.
    return [
        LayerSpec("a", "conv2d", 8, 8, 0.1, None, [3, 5, 7], [3, 5, 7]),
        LayerSpec("b", "linear", 8, 8, 0.1, None, [13], [11]),
        LayerSpec("c", "conv2d", 8, 8, 0.1, None, [1, 1, 1], [2, 3, 3]),
    ]


def test_align_up() -> None:
    assert [align_up(n) for n in (0, 1, 255, 256, 257)] == [0, 256, 256, 256, 512]
    with pytest.raises(ValueError):
        align_up(10, 100)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 3])
def test_state_layout_offsets_are_aligned_and_disjoint(dtype: torch.dtype, batch: int) -> None:
    layout = state_layout(_layers(), batch, dtype)
    item = torch.empty((), dtype=dtype).element_size()
    assert [s.input_name for s in layout.slots] == [
        "a_hat_in.a",
        "o_hat_in.a",
        "a_hat_in.b",
        "o_hat_in.b",
        "a_hat_in.c",
        "o_hat_in.c",
    ]
    assert layout.slots[2].shape == (batch, 13) and layout.slots[3].output_name == "o_hat_out.b"
    end = 0
    for slot in layout.slots:
        assert slot.offset % ALIGNMENT == 0 and slot.offset >= end
        assert slot.nbytes == item * int(np.prod(slot.shape))
        end = slot.offset + slot.nbytes
    assert layout.set_bytes == align_up(end) and layout.total_bytes == 2 * layout.set_bytes


def test_state_buffers_views_share_one_aligned_allocation() -> None:
    layout = state_layout(_layers(), 2, torch.float16)
    buffers = StateBuffers(layout)
    assert buffers.base_ptr % ALIGNMENT == 0
    storages = set()
    for index in (0, 1):
        for view in buffers.inputs(index).values():
            assert view.data_ptr() % ALIGNMENT == 0
            assert view.is_contiguous() and view.dtype == torch.float16
            storages.add(view.untyped_storage().data_ptr())
    assert len(storages) == 1  # one allocation
    # Set B starts after set A; writing one set's views never touches the other set.
    buffers.zero_()
    for view in buffers.outputs(1).values():
        view.fill_(1)
    assert all(float(v.abs().sum()) == 0 for v in buffers.inputs(0).values())
    assert buffers.inputs(1)["o_hat_in.b"].data_ptr() == buffers.outputs(1)["o_hat_out.b"].data_ptr()
    assert buffers.inputs(1)["a_hat_in.a"].data_ptr() - buffers.inputs(0)["a_hat_in.a"].data_ptr() == layout.set_bytes


def test_layout_from_manifest_uses_state_dtype(tmp_path: Path) -> None:
    manifest = make_tiny_export(tmp_path, dtype="float16")
    layout = layout_from_manifest(manifest, 5)
    assert layout.dtype == torch.float16 and layout.batch_size == 5
    assert {s.input_name for s in layout.slots} == {
        i.name for i in manifest.graphs["step"].inputs if "_hat_in." in i.name
    }


# -- sidecar --------------------------------------------------------------------------------


def _sidecar(**kw) -> EngineSidecar:
    base = dict(
        engine="step",
        plan_file="step.plan",
        onnx_file="step.onnx",
        onnx_sha256="ab" * 32,
        tensorrt_version="10.13.0.35",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        profile={"x": {"min": [1, 3], "opt": [8, 3], "max": [16, 3]}},
        build_seconds=12.5,
        modiff_trt_version="0.1.0",
    )
    base.update(kw)
    return EngineSidecar(**base)


def test_sidecar_roundtrip_and_match(tmp_path: Path) -> None:
    side = sidecar_path(tmp_path / "step.plan")
    assert side.name == "step.plan.json"
    write_sidecar(_sidecar(), side)
    loaded = read_sidecar(side)
    assert loaded == _sidecar()
    check_sidecar(loaded, "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0", "ab" * 32)  # no error
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


@pytest.mark.parametrize(
    "running, gpu, cc, sha, needle",
    [
        ("10.14.1.48", "NVIDIA H100 80GB HBM3", "9.0", "ab" * 32, "TensorRT 10.13.0.35 but TensorRT 10.14.1.48"),
        ("10.13.0.35", "NVIDIA A100-SXM4-80GB", "8.0", "ab" * 32, "compute capability 9.0"),
        ("10.13.0.35", "NVIDIA H100 PCIe", "9.0", "ab" * 32, "tuned on a NVIDIA H100 80GB HBM3"),
        ("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0", "cd" * 32, "different step.onnx"),
    ],
)
def test_sidecar_mismatch_is_refused_with_fix(running, gpu, cc, sha, needle) -> None:
    with pytest.raises(ArtifactError) as info:
        check_sidecar(_sidecar(), running, gpu, cc, sha)
    assert needle in str(info.value)
    assert "modiff-trt build" in str(info.value)


def test_version_compatible_plans_run_on_newer_releases_and_the_next_major() -> None:
    """Bug 2: TensorRT documents that version-compatible 10.x plans run on 11.x; plain plans never cross."""
    gpu = ("NVIDIA H100 80GB HBM3", "9.0")
    side = _sidecar(version_compatible=True)
    check_sidecar(side, "10.14.1.48", *gpu)  # later release, same major
    check_sidecar(side, "11.0.0.1", *gpu)  # next major
    check_sidecar(side, "11.4.1.3", *gpu)
    for running in ("12.0.0.1", "10.12.0.1", "9.3.0.1"):
        with pytest.raises(ArtifactError, match="version-compatible") as info:
            check_sidecar(side, running, *gpu)
        assert "on 11.x" in str(info.value)
    with pytest.raises(ArtifactError, match="TensorRT 10.13.0.35 but TensorRT 11.0.0.1"):
        check_sidecar(_sidecar(), "11.0.0.1", *gpu)


def test_read_sidecar_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="modiff-trt build"):
        read_sidecar(tmp_path / "step.plan.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_sidecar(tmp_path / "bad.json")


# -- build without TensorRT -----------------------------------------------------------------


def test_profile_shapes_follow_x_batch(tmp_path: Path) -> None:
    manifest = make_tiny_export(tmp_path)
    batch = trt_build.resolve_batch_range(manifest, None, 8, 32)
    shapes = trt_build.profile_shapes(manifest.graphs["step"], batch)
    assert shapes["x"].min == (1, 4, 4, 4) and shapes["x"].opt == (8, 4, 4, 4) and shapes["x"].max == (32, 4, 4, 4)
    assert shapes["t"].to_dict() == {"min": [1], "opt": [8], "max": [32]}
    for layer in LAYERS:
        assert shapes[f"o_hat_in.{layer}"] == shapes["x"]
    assert set(trt_build.profile_shapes(manifest.graphs["warmup"], batch)) == {"x", "t"}


def test_batch_range_validation(tmp_path: Path) -> None:
    manifest = make_tiny_export(tmp_path)
    assert trt_build.resolve_batch_range(manifest, None, None, None) == trt_build.BatchRange(1, 16, 16)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        trt_build.resolve_batch_range(manifest, 8, 4, 16)
    fixed = make_tiny_export(tmp_path / "fixed", batch_size=4)
    assert trt_build.resolve_batch_range(fixed, None, None, None) == trt_build.BatchRange(4, 4, 4)
    with pytest.raises(ConfigError, match="fixed batch size 4"):
        trt_build.resolve_batch_range(fixed, None, None, 8)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: this checks the error shown without it")
def test_build_without_tensorrt_says_how_to_install(tmp_path: Path) -> None:
    make_tiny_export(tmp_path, dtype="float16")
    with pytest.raises(BackendUnavailableError) as info:
        trt_build.build_engines(tmp_path)
    message = str(info.value)
    assert "pip install 'modiff-trt[trt]'" in message and "tensorrt-cu12" in message
    assert not list(tmp_path.glob("*.plan*"))


def test_build_rejects_missing_export_before_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="manifest.json not found"):
        trt_build.build_engines(tmp_path)


class _FakeError:
    """Shaped like tensorrt.ParserError, to test message formatting only (no TensorRT involved)."""

    def __init__(self, node: str, op: str, desc: str) -> None:
        self._node, self._op, self._desc = node, op, desc

    def node_name(self) -> str:
        return self._node

    def node_operator(self) -> str:
        return self._op

    def desc(self) -> str:
        return self._desc


def test_parser_errors_name_the_nodes() -> None:
    class Parser:
        errors = [_FakeError("/down.0/conv/Conv", "Conv", "Assertion failed: zero point must be 0")]
        num_errors = 1

        def get_error(self, i: int) -> _FakeError:
            return self.errors[i]

    assert trt_build.parser_errors(Parser()) == [
        "node /down.0/conv/Conv (Conv): Assertion failed: zero point must be 0"
    ]


# -- runtime and profile without TensorRT ---------------------------------------------------


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: this checks the error shown without it")
def test_runtime_without_tensorrt_says_how_to_install(tmp_path: Path) -> None:
    from modiff_trt.engines.trt_runtime import TensorRTRunner

    make_tiny_export(tmp_path, dtype="float16")
    with pytest.raises(BackendUnavailableError, match="pip install"):
        TensorRTRunner(tmp_path)


def test_profile_dry_run_prints_command_and_writes_real_state(tmp_path: Path) -> None:
    make_tiny_export(tmp_path, dtype="float16")
    result = trtexec.profile_engine(tmp_path, engine="step", batch=2, per_layer=True, dry_run=True)
    cmd = result.command
    assert cmd[0] == "trtexec" and f"--loadEngine={tmp_path / 'step.plan'}" in cmd
    shapes = next(a for a in cmd if a.startswith("--shapes="))
    assert "x:2x4x4x4" in shapes and "t:2" in shapes and f"a_hat_in.{LAYERS[1]}:2x4x4x4" in shapes
    load = next(a for a in cmd if a.startswith("--loadInputs="))
    files = dict(item.split(":", 1) for item in load[len("--loadInputs=") :].split(","))
    manifest = load_manifest(tmp_path)
    assert set(files) == {t.name for t in manifest.graphs["step"].inputs}
    # The state files hold a real warm-up state: a_hat of layer 1 is x itself (fp warm-up).
    x = np.fromfile(files["x"], dtype=np.float16)
    a_hat = np.fromfile(files[f"a_hat_in.{LAYERS[0]}"], dtype=np.float16)
    assert x.size == 2 * 64 and np.array_equal(x, a_hat) and np.abs(x).sum() > 0
    assert np.abs(np.fromfile(files[f"o_hat_in.{LAYERS[0]}"], dtype=np.float16)).sum() > 0
    assert np.fromfile(files["t"], dtype=np.float32).tolist() == [500.0, 500.0]


def test_profile_without_plan_or_trtexec(tmp_path: Path) -> None:
    make_tiny_export(tmp_path)
    with pytest.raises(ArtifactError, match="modiff-trt build"):
        trtexec.profile_engine(tmp_path, engine="warmup")
    (tmp_path / "warmup.plan").write_bytes(b"not really a plan")
    with pytest.raises(BackendUnavailableError, match="--trtexec"):
        trtexec.profile_engine(tmp_path, engine="warmup", trtexec="definitely-not-trtexec-xyz")


def test_profile_zero_state_when_asked(tmp_path: Path) -> None:
    make_tiny_export(tmp_path)
    result = trtexec.profile_engine(tmp_path, engine="step", batch=1, dry_run=True, real_state=False)
    load = next(a for a in result.command if a.startswith("--loadInputs="))
    files = dict(item.split(":", 1) for item in load[len("--loadInputs=") :].split(","))
    assert not np.fromfile(files[f"o_hat_in.{LAYERS[1]}"], dtype=np.float32).any()


# -- trtexec: version-compatible plans, its own version, paths, profiles -------------------------


def _write_sidecar_for(export_dir: Path, engine: str, **kw) -> None:
    (export_dir / f"{engine}.plan").write_bytes(b"plan bytes")
    write_sidecar(_sidecar(engine=engine, plan_file=f"{engine}.plan", **kw), export_dir / f"{engine}.plan.json")


def test_profile_loads_version_compatible_plans_with_version_compatible_flag(tmp_path: Path) -> None:
    """Bug 3: trtexec only lets a plan's embedded lean runtime load with --versionCompatible."""
    make_tiny_export(tmp_path)
    _write_sidecar_for(tmp_path, "step", version_compatible=True)
    cmd = trtexec.profile_engine(tmp_path, engine="step", dry_run=True, real_state=False).command
    assert "--versionCompatible" in cmd and f"--loadEngine={tmp_path / 'step.plan'}" in cmd
    _write_sidecar_for(tmp_path, "step")
    assert "--versionCompatible" not in trtexec.profile_engine(tmp_path, dry_run=True, real_state=False).command


def test_load_inputs_paths_with_separators_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModiffError, match="move the export directory to a path without ',' or ':'"):
        trtexec.load_inputs_spec({"x": tmp_path / "a,b" / "x.bin"})
    with pytest.raises(ModiffError, match="splits on ','"):
        trtexec.load_inputs_spec({"x": "C:/data/x.bin"})
    assert trtexec.load_inputs_spec({"in:0": tmp_path / "x.bin"}) == f"'in:0':{tmp_path / 'x.bin'}"


def test_layer_profile_with_bare_nan_and_inf(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(
        '[{ "count" : 10 }\n, { "name" : "fast", "timeMs" : 0.5, "averageMs" : 0.05, "medianMs" : nan, '
        '"percentage" : -nan }\n, { "name" : "slow", "timeMs" : 9, "averageMs" : inf, "percentage" : 90 }]'
    )
    summary = trtexec.summarize_layer_profile(path)
    fast = next(layer for layer in summary.layers if layer.name == "fast")
    assert summary.runs == 10 and fast.median_ms is None and fast.percentage == 0.0
    assert next(layer for layer in summary.layers if layer.name == "slow").average_ms == 0.0


def _fake_trtexec(tmp_path: Path, version_code: int) -> str:
    """A script that prints trtexec's banner, to test version parsing (it is not trtexec)."""
    script = tmp_path / f"trtexec-{version_code}"
    script.write_text(
        f"#!/bin/sh\necho '&&&& RUNNING TensorRT.trtexec [TensorRT v{version_code}] [b11] # trtexec $*'\n"
    )
    script.chmod(0o755)
    return str(script)


def test_trtexec_must_belong_to_the_plans_tensorrt_release(tmp_path: Path) -> None:
    assert trtexec.trtexec_version(_fake_trtexec(tmp_path, 101300)) == "10.13.0"
    trtexec.check_trtexec(_fake_trtexec(tmp_path, 101300), _sidecar())  # 10.13.0.35 plan
    with pytest.raises(ArtifactError, match="TensorRT 10.14.1 and cannot load step.plan.*trtexec of TensorRT 10.13.0"):
        trtexec.check_trtexec(_fake_trtexec(tmp_path, 101401), _sidecar())
    trtexec.check_trtexec(_fake_trtexec(tmp_path, 110100), _sidecar(version_compatible=True))
    with pytest.raises(BackendUnavailableError, match="--trtexec"):
        trtexec.check_trtexec(str(tmp_path / "missing-trtexec"), _sidecar())


def test_per_layer_warns_without_detailed_profile_and_fixed_batch_is_checked(tmp_path: Path, caplog) -> None:
    make_tiny_export(tmp_path, batch_size=2)
    _write_sidecar_for(tmp_path, "warmup", builder={"profiling_verbosity": "layer_names_only"})
    with caplog.at_level("WARNING", logger="modiff_trt.engines.trtexec"):
        trtexec.profile_engine(tmp_path, engine="warmup", batch=2, per_layer=True, dry_run=True)
    assert any("--detailed-profile" in r.getMessage() for r in caplog.records)
    with pytest.raises(ModiffError, match="exported for batch 2: use --batch 2"):
        trtexec.profile_engine(tmp_path, engine="warmup", batch=3, dry_run=True)
