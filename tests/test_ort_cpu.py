"""The `ort-cpu` export target: integer kernels (ConvInteger/MatMulInteger) that keep MoDiff exact."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.errors import ConfigError
from modiff_trt.export.exporter import export_model
from modiff_trt.export.lint import lint_export, lint_graph
from modiff_trt.export.manifest import load_manifest
from modiff_trt.quant import QuantConfig
from tests.helpers.export import SEQ, SHAPE, check_step_layers, export, tiny_model_config, trajectory
from tests.helpers.models import rel_err


@pytest.fixture
def noise():
    return torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(7))


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(8, 8),
        QuantConfig(8, 4, split=True),
        QuantConfig(4, 8, first_step="quantized"),
    ],
    ids=lambda c: f"{c.label}{'-split' if c.split else ''}-{c.first_step}",
)
def test_every_layer_of_integer_step_graph_follows_modiff_at_every_step(tmp_path, tiny_model, noise, config):
    """Same per-layer check as the TensorRT-style graph: codes exact, a_hat/o_hat updates exact."""
    qmodel, out = export(tmp_path, tiny_model, config, target="ort-cpu")
    assert check_step_layers(out, qmodel, noise) == len(qmodel.layers) * (len(SEQ) - 1)
    ops = _ops(out / "step.onnx")
    convs = sum(len(layer.groups) for layer in qmodel.layers.values() if layer.kind == "conv2d")
    linears = sum(layer.kind == "linear" for layer in qmodel.layers.values())
    assert ops["ConvInteger"] == convs and ops["MatMulInteger"] == linears
    assert ops["Conv"] == ops["Gemm"] == 0  # no float conv/linear left (attention matmuls stay float)
    assert lint_export(out) == []
    if config.first_step == "quantized":
        assert _ops(out / "warmup.onnx")["ConvInteger"] == convs
    bits = {layer.name: layer.weight_bits for layer in load_manifest(out).layers}
    assert bits["conv_in"] == bits["conv_out"] == 8  # W4: the first and last layer keep 8-bit integer weights
    assert {b for name, b in bits.items() if name not in ("conv_in", "conv_out")} == {config.weight_bits}


def test_integer_graph_matches_trt_graph_and_reference_over_trajectory(tmp_path, tiny_model, noise):
    """Same drift bound against the reference as the TensorRT-style graph, and the first layer
    (which reads x directly) gets bit-identical codes from both graphs."""
    qmodel, trt = export(tmp_path, tiny_model, QuantConfig(8, 8), "trt")
    _, cpu = export(tmp_path, tiny_model, QuantConfig(8, 8), "cpu", target="ort-cpu")
    reference = trajectory(qmodel, noise)
    cpu_traj = trajectory(OrtRunner(cpu), noise)
    assert rel_err(cpu_traj, reference) < 5e-3
    assert rel_err(cpu_traj, trajectory(OrtRunner(trt), noise)) < 5e-3

    import onnxruntime as ort

    feeds = {"x": noise.numpy(), "t": np.full(4, float(SEQ[-1]), np.float32)}
    warm = ort.InferenceSession(str(trt / "warmup.onnx"), providers=["CPUExecutionProvider"])
    state = {
        o.name.replace("_out.", "_in."): v
        for o, v in zip(warm.get_outputs(), warm.run(None, feeds))
        if "_out." in o.name
    }
    feeds = {"x": (noise * 0.9).numpy(), "t": np.full(4, float(SEQ[-2]), np.float32), **state}
    results = []
    for out in (trt, cpu):
        session = ort.InferenceSession(str(out / "step.onnx"), providers=["CPUExecutionProvider"])
        results.append(dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds))))
    assert np.array_equal(results[0]["a_hat_out.conv_in"], results[1]["a_hat_out.conv_in"])
    np.testing.assert_allclose(results[1]["o_hat_out.conv_in"], results[0]["o_hat_out.conv_in"], rtol=1e-5, atol=1e-5)


def test_plain_integer_export_and_lint_by_target(tmp_path, tiny_model):
    _, out = export(tmp_path, tiny_model, QuantConfig(8, 8, modulate=False), target="ort-cpu")
    assert _ops(out / "unet.onnx")["ConvInteger"] > 0
    assert lint_export(out) == []
    rules = {i.rule for i in lint_graph(onnx.load(str(out / "unet.onnx")), "unet", target="trt")}
    assert {"forbidden-op", "zero-point"} <= rules  # not a TensorRT graph, and lint says so


def test_unknown_target_is_refused(tmp_path, tiny_model):
    from modiff_trt.quant import quantize_unet

    qmodel = quantize_unet(tiny_model, QuantConfig(8, None))
    with pytest.raises(ConfigError, match="target"):
        export_model(tiny_model, qmodel, tiny_model_config(tiny_model), tmp_path / "x", target="cuda-int4")
