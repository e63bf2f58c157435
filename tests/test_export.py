"""Export: graphs vs the PyTorch reference on ONNX Runtime, the TensorRT lint, the manifest,
and the errors and atomicity promised for bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.errors import ArtifactError, ConfigError, ModiffError
from modiff_trt.export import exporter, weight_store
from modiff_trt.export.exporter import export_model
from modiff_trt.export.lint import LintIssue, lint_export, lint_graph
from modiff_trt.export.manifest import Manifest, load_manifest
from modiff_trt.export.qdq import FP16_MIN_NORMAL
from modiff_trt.export.sites import find_sites
from modiff_trt.models import load_config
from modiff_trt.quant import QuantConfig, quantize_unet
from modiff_trt.quant.quantizers import fake_quantize
from modiff_trt.sampling import ddim_sample, ddim_timesteps
from tests.helpers.export import (
    BETAS,
    SEQ,
    SHAPE,
    absmax_scales,
    check_step_layers,
    export,
    tiny_model_config,
    trajectory,
)
from tests.helpers.models import rel_err


@pytest.fixture
def noise():
    return torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("state_dtype", ["float32", "float16"])
def test_weight_only_modiff_graphs_match_reference_over_trajectory(tmp_path, tiny_model, noise, state_dtype):
    """Float activations: no rounding boundaries, so ORT must track the reference to float precision."""
    qmodel, out = export(tmp_path, tiny_model, QuantConfig(8, None, state_dtype=state_dtype))
    err = rel_err(trajectory(OrtRunner(out), noise), trajectory(qmodel, noise))
    assert err < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(8, 8),
        QuantConfig(8, 4, split=True),
        QuantConfig(4, 8),
        QuantConfig(8, 4, first_step="quantized"),
        QuantConfig(8, 8, state_dtype="float16", state_layout="scaled"),
        QuantConfig(8, 4, split=True, state_dtype="float16", state_layout="scaled"),
        QuantConfig(8, 4, first_step="quantized", state_layout="scaled"),
    ],
    ids=lambda c: f"{c.label}{'-split' if c.split else ''}-{c.first_step}-{c.state_dtype}-{c.state_layout}",
)
def test_every_layer_of_ort_step_graph_follows_modiff_at_every_step(tmp_path, tiny_model, noise, config):
    """On ONNX Runtime's own tensors, per layer and step: rq = Q(x - a_hat_in) exactly (but at
    rounding ties), a_hat_out = a_hat_in + rq, o_hat_out = o_hat_in + f(rq, Wq)."""
    qmodel, out = export(tmp_path, tiny_model, config)
    assert check_step_layers(out, qmodel, noise) == len(qmodel.layers) * (len(SEQ) - 1)


def test_quantized_trajectory_stays_close_and_modiff_beats_plain_on_ort(tmp_path, tiny_model, noise):
    fp = trajectory(tiny_model, noise)[-1]
    q8, out8 = export(tmp_path, tiny_model, QuantConfig(8, 8), "w8a8")
    ort8 = trajectory(OrtRunner(out8), noise)
    # Float rounding moves a handful of residuals across rounding boundaries; the drift stays small.
    assert rel_err(ort8, trajectory(q8, noise)) < 5e-3
    _, plain = export(tmp_path, tiny_model, QuantConfig(8, 4, modulate=False), "plain")
    _, modiff = export(tmp_path, tiny_model, QuantConfig(8, 4), "modiff")
    assert rel_err(trajectory(OrtRunner(modiff), noise)[-1], fp) < 0.5 * rel_err(
        trajectory(OrtRunner(plain), noise)[-1], fp
    )


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(8, 8),
        QuantConfig(8, 4, modulate=False, split=True),
        QuantConfig(4, 8, first_step="quantized", state_dtype="float16"),
        QuantConfig(8, 8, state_dtype="float16", state_layout="scaled"),
    ],
)
def test_lint_passes_on_exports_and_manifest_round_trips(tmp_path, tiny_model, config):
    qmodel, out = export(tmp_path, tiny_model, config)
    assert lint_export(out) == []
    manifest = load_manifest(out)
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    assert [layer.name for layer in manifest.layers] == list(qmodel.layers)
    assert set(manifest.graphs) == ({"warmup", "step"} if config.modulate else {"unet"})
    if config.modulate:
        step_inputs = {t.name for t in manifest.graphs["step"].inputs}
        kept = {f"a_hat_in.{layer.name}" for layer in manifest.layers if layer.a_hat_owner is None}
        assert {n for n in step_inputs if n.startswith("a_hat_in.")} == kept
        assert len(kept) < len(qmodel.layers)  # q/k/v and temb_proj share
        dtype = {t.name: t.dtype for t in manifest.graphs["step"].outputs}
        assert dtype["o_hat_out.conv_in"] == config.state_dtype
        assert manifest.export.state_layout == config.state_layout


def _tiny_qdq_graph(zero_point=0, scale_const=True, per_channel_act=False, weight_dq=True, op="Conv"):
    """A one-layer graph in the exporter's style, with one rule broken on request."""
    nodes, inits = (
        [],
        [
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
            numpy_helper.from_array(np.ones((4, 4, 1, 1), np.int8), "w"),
            numpy_helper.from_array(np.full(4, 0.1, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(4, np.int8), "wzp"),
            numpy_helper.from_array(np.array(zero_point, np.int8), "zp_bad"),
        ],
    )
    scale = "s"
    if per_channel_act:
        inits.append(numpy_helper.from_array(np.full(4, 0.1, np.float32), "s"))
    elif scale_const:
        inits.append(numpy_helper.from_array(np.array(0.1, np.float32), "s"))
    else:
        nodes.append(helper.make_node("ReduceMax", ["x"], ["s"], keepdims=0))
    nodes += [
        helper.make_node("QuantizeLinear", ["x", scale, "zp_bad"], ["q"], axis=1),
        helper.make_node("DequantizeLinear", ["q", scale, "zp_bad"], ["xq"], axis=1),
    ]
    if weight_dq:
        nodes.append(helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wf"], axis=0))
    else:
        inits.append(numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "wf"))
    nodes.append(
        helper.make_node(op, ["xq", "wf"], ["y"])
        if op == "Conv"
        else helper.make_node("ConvInteger", ["q", "w"], ["y"])
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    "broken,rule",
    [
        (dict(zero_point=3), "zero-point"),
        (dict(scale_const=False), "scale"),
        (dict(per_channel_act=True), "scale"),
        (dict(weight_dq=False), "qdq-inputs"),
        (dict(op="ConvInteger"), "forbidden-op"),
    ],
)
def test_lint_catches_seeded_violations(broken, rule):
    assert lint_graph(_tiny_qdq_graph()) == []
    issues = lint_graph(_tiny_qdq_graph(**broken))
    assert rule in {i.rule for i in issues}


def test_lint_flags_subnormal_fp16_scales():
    model = _tiny_qdq_graph()
    for init in model.graph.initializer:
        if init.name == "s":
            init.CopyFrom(numpy_helper.from_array(np.array(1e-5, np.float16), "s"))
    model.opset_import[0].version = 19
    issues = lint_graph(model)
    assert [i.rule for i in issues] == ["scale", "scale"] and "smallest normal" in issues[0].message


def test_fp16_export_floors_tiny_scales_and_records_them(tmp_path, tiny_model):
    """A 1e-8 scale (the calibrators' floor for an all-zero residual) is 0 in fp16, which TensorRT's
    parser rejects; fp16 exports raise every scale to fp16's smallest normal and say which."""
    config = QuantConfig(8, 8, act_scales="static")
    scales = absmax_scales(tiny_model, config, SHAPE)
    scales.layers["conv_in"].act = [1e-8]
    qmodel = quantize_unet(tiny_model, config, scales)
    out = tmp_path / "fp16"
    manifest = export_model(tiny_model, qmodel, tiny_model_config(tiny_model), out, float_dtype="float16")
    assert manifest.export.scale_floor == FP16_MIN_NORMAL == 2.0**-14
    assert manifest.export.floored_scales == ("conv_in/act",)
    step = onnx.load(str(out / "step.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in step.graph.initializer}
    q_scales = [inits[n.input[1]] for n in step.graph.node if n.op_type == "QuantizeLinear"]
    assert min(float(v.min()) for v in q_scales) == np.float16(FP16_MIN_NORMAL)
    assert lint_export(out) == []
    fp32 = export_model(tiny_model, qmodel, tiny_model_config(tiny_model), tmp_path / "fp32")
    assert fp32.export.scale_floor is None and fp32.export.floored_scales == ()


def test_export_refuses_a_graph_that_fails_lint_and_writes_nothing(tmp_path, tiny_model, monkeypatch):
    qmodel, out = export(tmp_path, tiny_model, QuantConfig(8, None))
    before = (out / "manifest.json").read_text()
    seeded = [
        LintIssue("step", "scale", f"/layer{i}/QuantizeLinear", "scale must be finite and > 0") for i in range(25)
    ]
    monkeypatch.setattr(exporter, "lint_export", lambda directory: seeded)
    with pytest.raises(ArtifactError) as info:
        export_model(tiny_model, qmodel, tiny_model_config(tiny_model), out)
    message = str(info.value)
    assert "25 TensorRT explicit-quantization rule(s)" in message and "nothing was written" in message
    assert "step: [scale] /layer0/QuantizeLinear: scale must be finite and > 0" in message and "5 more" in message
    assert (out / "manifest.json").read_text() == before  # the earlier export is untouched
    with pytest.raises(ArtifactError):
        export_model(tiny_model, qmodel, tiny_model_config(tiny_model), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp or partial directory left


def test_lint_catches_unpaired_state_and_versions():
    model = _tiny_qdq_graph()
    model.graph.input.append(helper.make_tensor_value_info("a_hat_in.L", onnx.TensorProto.FLOAT, [1, 4]))
    model.ir_version = 11
    rules = {i.rule for i in lint_graph(model)}
    assert {"state-pairs", "ir-version"} <= rules


def test_export_refuses_dynamic_scales_and_bad_opset(tmp_path, tiny_model):
    qmodel = quantize_unet(tiny_model, QuantConfig(8, 8))
    with pytest.raises(ConfigError, match="static activation scales"):
        export_model(tiny_model, qmodel, tiny_model_config(tiny_model), tmp_path / "x")
    weight_only = quantize_unet(tiny_model, QuantConfig(8, None))
    with pytest.raises(ConfigError, match="opset 13"):
        export_model(tiny_model, weight_only, tiny_model_config(tiny_model), tmp_path / "x", opset=13)
    assert not (tmp_path / "x").exists()


def test_interrupted_export_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    calls = []
    real = exporter.insert_quantization

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(exporter, "insert_quantization", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        export(tmp_path, tiny_model, QuantConfig(8, None), "broken")
    assert list(tmp_path.iterdir()) == []


def test_export_does_not_clobber_unrelated_directory(tmp_path, tiny_model):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not a complete earlier export"):
        export(tmp_path, tiny_model, QuantConfig(8, None), "photos")
    assert (tmp_path / "photos" / "cat.png").exists()


def test_manifest_and_file_errors(tmp_path, tiny_model):
    _, out = export(tmp_path, tiny_model, QuantConfig(8, None))
    with pytest.raises(ArtifactError, match="not an export directory"):
        load_manifest(tmp_path)
    data = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ArtifactError, match="version 99"):
        load_manifest(out)
    (out / "manifest.json").write_text(json.dumps(data))
    (out / "step.onnx").write_bytes((out / "step.onnx").read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="mixes two exports"):
        load_manifest(out)
    (out / "step.onnx").unlink()
    with pytest.raises(ArtifactError, match="step graph"):
        load_manifest(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(out)


def test_ort_runner_input_errors(tmp_path, tiny_model):
    _, out = export(tmp_path, tiny_model, QuantConfig(8, None), batch_size=2)
    runner = OrtRunner(out)
    t = torch.tensor([10.0, 10.0])
    with pytest.raises(ModiffError, match="--batch-size 2"):
        runner(torch.zeros(3, *SHAPE), torch.zeros(3))
    x = torch.randn(2, *SHAPE)
    runner.reset_state()
    full = runner(x, t)
    runner.reset_state()
    assert torch.equal(runner(x[:1], t[:1]), full[:1])  # a short last batch is padded, not refused
    with pytest.raises(ModiffError, match="exported for"):
        runner(torch.zeros(2, 3, 8, 8), t)
    bad = torch.zeros(2, *SHAPE)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModiffError, match="NaN"):
        runner(bad, t)
    assert runner(torch.zeros(2, *SHAPE), t).shape == (2, *SHAPE)


@pytest.mark.slow
def test_cifar10_step_graph_quantizes_all_113_layers(tmp_path):
    from modiff_trt.models import load_config, load_unet
    from modiff_trt.quant import LayerScales, ScaleSet

    cfg = load_config("ddim-cifar10")
    model = load_unet(cfg, None)
    probe = quantize_unet(model, QuantConfig(8, 8))
    scales = ScaleSet(True, {n: LayerScales(act=[0.01]) for n in probe.layers})
    qmodel = quantize_unet(model, QuantConfig(8, 8, act_scales="static"), scales)
    out = tmp_path / "cifar"
    manifest = export_model(model, qmodel, cfg, out)
    assert len(manifest.layers) == 113
    assert lint_export(out) == []
    step = onnx.load(str(out / "step.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in step.graph.node) == 113
    ins = {i.name for i in step.graph.input}
    outs = {o.name for o in step.graph.output}
    # one scale everywhere: every layer reading an already-read tensor shares its a_hat, i.e. each
    # attention block's k and v (q owns) and every ResBlock's temb_proj but the first
    owners = {layer.name: layer.a_hat_owner for layer in manifest.layers if layer.a_hat_owner}
    temb = sorted(n for n in qmodel.layers if n.endswith("temb_proj"))
    kv = sorted(n for n in qmodel.layers if n.endswith((".k", ".v")))
    assert sorted(owners) == sorted(temb[1:] + kv) and len(kv) == 12
    assert all(owner == f"{name[:-1]}q" for name, owner in owners.items() if name in kv)
    for layer in manifest.layers:
        for kind in ("a_hat", "o_hat"):
            carried = kind in layer.state_kinds
            assert (f"{kind}_in.{layer.name}" in ins) == carried and (f"{kind}_out.{layer.name}" in outs) == carried
    # the state of issue 22's CIFAR-10 figure: 42.6 MiB per sample with an a_hat per layer
    shared = sum(4 * int(np.prod(layer.a_hat_shape)) for layer in manifest.layers if layer.a_hat_owner)
    assert (manifest.state_bytes_per_sample() + shared) / 2**20 == pytest.approx(42.6, abs=0.05)
    assert manifest.state_bytes_per_sample() / 2**20 == pytest.approx(40.0, abs=0.05)  # fp16: 20.0


def test_fp16_export_keeps_timestep_embedding_fp32_and_tracks_reference(tmp_path, tiny_model, noise, monkeypatch):
    searches = []
    monkeypatch.setattr(exporter, "find_sites", lambda *a: searches.append(1) or find_sites(*a))
    qmodel, out = export(tmp_path, tiny_model, QuantConfig(8, 8), float_dtype="float16")
    assert len(searches) == 1  # every initializer read once per export, not once per graph
    assert lint_export(out) == []
    manifest = load_manifest(out)
    assert manifest.export.opset == 19
    step = onnx.load(str(out / "step.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in list(step.graph.input) + list(step.graph.output)}
    assert types["t"] == onnx.TensorProto.FLOAT and types["x"] == onnx.TensorProto.FLOAT16
    assert types["eps"] == onnx.TensorProto.FLOAT16
    inits = {i.name: i for i in step.graph.initializer}
    scales = [inits[n.input[1]] for n in step.graph.node if n.op_type == "QuantizeLinear"]
    assert scales and all(s.data_type == onnx.TensorProto.FLOAT16 for s in scales)
    sin = next(n for n in step.graph.node if n.op_type == "Sin")  # the embedding runs before any Cast
    assert all(i not in inits or inits[i].data_type != onnx.TensorProto.FLOAT16 for i in sin.input)
    # fp16 rounding of activations and scales: an fp16-sized bound against the fp32 reference.
    assert rel_err(trajectory(OrtRunner(out), noise[:2]), trajectory(qmodel, noise[:2])) < 1e-2


def test_asymmetric_imported_activation_grid_runs_exactly_on_int8(tmp_path, tiny_model):
    """Q-Diffusion's asymmetric b<=7-bit activation grids become a clipped symmetric int8 Q/DQ."""
    import onnxruntime as ort

    from modiff_trt.export.qdq import Emitter, _fake_quant, act_grid
    from modiff_trt.quant import LayerScales, ScaleSet

    config = QuantConfig(8, 4, modulate=False, act_scales="static")
    probe = quantize_unet(tiny_model, config.__class__(8, 4, modulate=False))
    scales = ScaleSet(False, {n: LayerScales(act=[0.05], act_zero_point=[5.0]) for n in probe.layers})
    qmodel = quantize_unet(tiny_model, config, scales)
    layer = qmodel.layers["conv_in"]
    em = Emitter("conv_in", np.dtype("float32"))
    y = _fake_quant(em, "x", act_grid(layer, 0.05, 5.0))
    graph = helper.make_graph(
        em.nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4096])],
        [helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [4096])],
        em.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = torch.linspace(-1.0, 1.0, 4096)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    want = fake_quantize(x, torch.tensor(0.05), 4, torch.tensor(5.0))
    assert torch.equal(torch.from_numpy(got), want)
    out = tmp_path / "asym"
    export_model(tiny_model, qmodel, tiny_model_config(tiny_model), out)
    assert lint_export(out) == []
    assert load_manifest(out).layers[0].act_zero_point == [5.0]
    wide = ScaleSet(False, {n: LayerScales(act=[0.05], act_zero_point=[100.0]) for n in probe.layers})
    eight = quantize_unet(tiny_model, QuantConfig(8, 8, modulate=False, act_scales="static"), wide)
    with pytest.raises(ArtifactError, match="outside int8"):
        export_model(tiny_model, eight, tiny_model_config(tiny_model), tmp_path / "wide")


def test_gpu_ort_providers_are_refused_clearly_without_onnxruntime_gpu(tmp_path, tiny_model):
    import onnxruntime as ort

    _, out = export(tmp_path, tiny_model, QuantConfig(8, None))
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("onnxruntime-gpu with a GPU is present")
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(ModiffError, match="onnxruntime-gpu"):
            OrtRunner(out, provider=provider)
    with pytest.raises(ConfigError, match="unknown ONNX Runtime provider"):
        OrtRunner(out, provider="rocm")
    assert OrtRunner(out, provider="auto").device.type == "cpu"


def test_streamed_weights_make_the_same_graphs_with_weights_beside_them(tmp_path, tiny_model, noise, monkeypatch):
    """Large models (SD: 0.86 GB of int8 weights, 1.7 GB of fp16 warm-up weights) stream their
    weights into `<graph>.data` as the Q/DQ pass makes them; forced here on a tiny model, the
    graphs compute exactly what the in-memory export computes and pass the per-layer check."""
    config = QuantConfig(8, 8, split=True)
    _, inline = export(tmp_path, tiny_model, config, name="inline")
    monkeypatch.setattr(exporter, "STREAM_BYTES", 0)
    monkeypatch.setattr(weight_store, "INLINE_BYTES", 1024)
    qmodel, out = export(tmp_path, tiny_model, config, name="streamed")
    assert not (inline / "step.onnx.data").exists()
    for graph in ("warmup.onnx", "step.onnx"):
        assert (out / f"{graph}.data").stat().st_size > (out / graph).stat().st_size
        model = onnx.load(str(out / graph), load_external_data=False)
        offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
        assert offsets and all(offset % weight_store.ALIGNMENT == 0 for offset in offsets)
    assert lint_export(out) == []
    assert np.array_equal(trajectory(OrtRunner(out), noise), trajectory(OrtRunner(inline), noise))
    assert check_step_layers(out, qmodel, noise) == len(qmodel.layers) * (len(SEQ) - 1)
    data = out / "step.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\\0\\0\\0\\0")  # the manifest hash covers the weights too
    with pytest.raises(ArtifactError, match="mixes two exports"):
        load_manifest(out)


def test_step_group_graph_follows_the_reference_per_layer_and_step(tmp_path, tiny_model, noise):
    """Scales per step group, folded around one constant quantizer by the `step_scale_ratio`
    input: per layer and step on ORT's own tensors, rq = Q_g(x - a_hat_in) on the grid and
    o_hat_out = o_hat_in + f(rq, Wq); the runner fills the ratios (trajectory tracks the reference)."""
    qmodel, out = export(tmp_path, tiny_model, QuantConfig(8, 3, split=True), step_groups=3)
    assert qmodel.step_groups.count == 3
    assert check_step_layers(out, qmodel, noise) == len(qmodel.layers) * (len(SEQ) - 1)
    step = onnx.load(str(out / "step.onnx"))
    ratio = next(i for i in step.graph.input if i.name == "step_scale_ratio")
    width = sum(len(layer.groups) for layer in qmodel.layers.values())
    assert [d.dim_value for d in ratio.type.tensor_type.shape.dim] == [2, width]
    assert lint_export(out) == []
    manifest = load_manifest(out)
    assert manifest.step_groups.count == 3 and len(manifest.step_groups.ratios) == 3
    assert manifest.step_groups.ratios[0] == [[1.0] * width] * 2
    assert rel_err(trajectory(OrtRunner(out), noise), trajectory(qmodel, noise)) < 5e-3
    with pytest.raises(ConfigError, match="--steps 10 --skip-type quad"):
        ddim_sample(OrtRunner(out), noise, ddim_timesteps(12, "quad"), BETAS)


def test_export_that_does_not_fit_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """One line with the estimate and what is available, nothing written, the model never built."""
    from typer.testing import CliRunner

    from modiff_trt import memory
    from modiff_trt.cli import app
    from modiff_trt.engines import torch_backend

    (estimate,) = memory.export_estimate(load_config("sd-v1"), integer_weights=True)
    assert estimate.parts["weights fp32"] == 4 * 859_520_964 and estimate.parts["int8 weight codes"] == 859_520_964
    assert 6.0 * 10**9 < estimate.total < 7 * 10**9  # at or above the measured SD v1 peak (BENCHMARKS.md, issue 21)

    def never(*args, **kwargs):
        raise AssertionError("the model loaded before the memory check")

    monkeypatch.setattr(torch_backend, "load_reference", never)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**6)
    out = tmp_path / "e"
    result = CliRunner().invoke(app, ["export", "-c", "digits", "--act-bits", "0", "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: export needs about") and "0.0 GB available: close other jobs" in line


def test_layers_share_an_a_hat_only_with_the_same_input_and_quantizer(tmp_path, tiny_model):
    """q/k/v read one tensor with equal scales: k and v read q's a_hat. A k scaled otherwise keeps its own."""
    from modiff_trt.export.onnx_float import export_float_onnx
    from modiff_trt.export.shared_state import a_hat_owners

    config = QuantConfig(8, 8, act_scales="static")
    scales = absmax_scales(tiny_model, config, SHAPE)
    qmodel = quantize_unet(tiny_model, config, scales)
    graph = export_float_onnx(tiny_model, SHAPE, 17, None, None, list(qmodel.layers)).graph
    sites = find_sites(graph, qmodel.layers)
    owners = a_hat_owners(qmodel.layers, sites)
    attention = "down.1.attn.0"
    assert owners[f"{attention}.k"] == owners[f"{attention}.v"] == f"{attention}.q"
    assert f"{attention}.proj_out" not in owners and f"{attention}.q" not in owners
    qmodel.layers[f"{attention}.k"].scales.act = [2 * v for v in qmodel.layers[f"{attention}.k"].scales.act]
    owners = a_hat_owners(qmodel.layers, sites)
    assert f"{attention}.k" not in owners and owners[f"{attention}.v"] == f"{attention}.q"
