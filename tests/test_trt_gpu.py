"""GPU tests of the TensorRT backend (`-m gpu`): real TensorRT, real CUDA, no mocks.

Skipped with the reason when tensorrt is not importable or torch sees no CUDA device. They were
written without a GPU and have NOT been run yet (see docs/tensorrt.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.trt import make_tiny_export

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed (GPU machine only)"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]

STEPS, BATCH = 10, 3


def _ort_trajectory(export_dir: Path, x0: np.ndarray, ts: list[float]) -> list[np.ndarray]:
    """The same 10-step loop on ONNX Runtime (CPU), state carried in numpy: the reference."""
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(export_dir / f"{k}.onnx"), providers=["CPUExecutionProvider"]) for k in ("warmup", "step")}
    x, state, eps_list = x0.copy(), {}, []
    for k, t in enumerate(ts):
        feeds = {"x": x, "t": np.full(len(x), t, np.float32), **state}
        session = sessions["warmup" if k == 0 else "step"]
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        state = {n.replace("_out.", "_in."): v for n, v in outs.items() if n != "eps"}
        eps_list.append(outs["eps"])
        x = (x - 0.1 * outs["eps"]).astype(np.float32)
    return eps_list


def _trt_trajectory(runner, x0: np.ndarray, ts: list[float]) -> list[np.ndarray]:
    x = torch.from_numpy(x0).cuda()
    runner.reset_state()
    eps_list = []
    for t in ts:
        eps = runner(x, torch.full((len(x),), t, device="cuda"))
        eps_list.append(eps.cpu().numpy())
        x = x - 0.1 * eps
    return eps_list


@pytest.fixture(scope="module")
def built_export(tmp_path_factory) -> Path:
    from modiff_trt.engines.trt_build import build_engines

    out = tmp_path_factory.mktemp("tiny_trt")
    make_tiny_export(out, dtype="float32")
    plans = build_engines(out, min_batch=1, opt_batch=BATCH, max_batch=8)
    assert [p.name for p in plans] == ["warmup.plan", "step.plan"]
    assert all((out / f"{p.name}.json").is_file() for p in plans)
    return out


def _inputs() -> tuple[np.ndarray, list[float]]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((BATCH, 4, 4, 4)).astype(np.float32), [float(t) for t in np.linspace(900, 0, STEPS)]


def test_trt_matches_onnxruntime_over_trajectory(built_export: Path) -> None:
    from modiff_trt.engines.trt_runtime import TensorRTRunner

    x0, ts = _inputs()
    expected = _ort_trajectory(built_export, x0, ts)
    got = _trt_trajectory(TensorRTRunner(built_export), x0, ts)
    for k, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3, err_msg=f"step {k}")


def test_cuda_graph_replay_equals_eager(built_export: Path) -> None:
    from modiff_trt.engines.trt_runtime import TensorRTRunner

    x0, ts = _inputs()
    eager = _trt_trajectory(TensorRTRunner(built_export), x0, ts)
    graphed_runner = TensorRTRunner(built_export, cuda_graph=True)
    first = _trt_trajectory(graphed_runner, x0, ts)  # captures warm-up + both step arrangements
    replay = _trt_trajectory(graphed_runner, x0, ts)  # replays them
    for k in range(STEPS):
        np.testing.assert_array_equal(first[k], eager[k], err_msg=f"step {k} (capture pass)")
        np.testing.assert_array_equal(replay[k], eager[k], err_msg=f"step {k} (replay)")


def test_sidecar_refuses_other_tensorrt(built_export: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from modiff_trt.engines.trt_runtime import TensorRTRunner
    from modiff_trt.errors import ArtifactError

    copy = tmp_path / "copy"
    shutil.copytree(built_export, copy)
    side = copy / "step.plan.json"
    data = json.loads(side.read_text())
    data["tensorrt_version"] = "9.0.0"
    side.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="modiff-trt build"):
        TensorRTRunner(copy)
