"""Helpers for export tests: residual-absmax scales measured on float trajectories, exporting a
tiny model with them, ORT trajectories, and the per-layer MoDiff check of a step graph."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from modiff_trt.calibrators.search import activation_scale
from modiff_trt.engines.ort_backend import session_options
from modiff_trt.export.exporter import export_model
from modiff_trt.export.manifest import load_manifest
from modiff_trt.export.naming import STEP_SCALE_RATIO
from modiff_trt.export.qdq import step_ratio_table
from modiff_trt.models.ddim_config import DDIMModelConfig
from modiff_trt.quant import LayerScales, QuantConfig, ScaleSet, quantize_unet
from modiff_trt.quant.formats import layer_format
from modiff_trt.quant.scales import StepGroups
from modiff_trt.sampling import ddim_sample, ddim_timesteps, make_betas, make_sampler

SEQ, BETAS, SHAPE = ddim_timesteps(10, "quad"), make_betas("linear", 1e-4, 0.02).float(), (3, 16, 16)


def absmax_scales(model, config: QuantConfig, sample_shape, n=4, steps=10, step_groups: int = 1) -> ScaleSet:
    """Static scales: absmax of the residual (MoDiff) or raw input (plain), first-step raw absmax,
    in each layer's activation format; with `step_groups` > 1, residual scales per group of steps
    (`StepGroups.even`)."""
    groups = StepGroups.even(step_groups, ddim_timesteps(steps, "quad"), "quad") if step_groups > 1 else None
    probe = quantize_unet(model, QuantConfig(None, None, split=config.split))
    stats: dict[str, dict[str, list[torch.Tensor]]] = {}
    prev: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook(name, layer):
        def record(mod, args):
            x = args[0]
            entry = stats.setdefault(name, {"act": None, "warmup": None})
            value = x if (not config.modulate or name not in prev) else x - prev[name]
            key = "warmup" if name not in prev else "act"
            if not config.modulate:
                key = "act"
            calls[name] = calls.get(name, -1) + 1
            if key == "act" and groups is not None:
                key = f"act{groups.group_of(calls[name])}"
            amax = torch.stack([value[:, g].abs().amax() for g in layer.groups])
            entry[key] = amax if entry.get(key) is None else torch.maximum(entry[key], amax)
            prev[name] = x.clone()

        return record

    for name, layer in probe.layers.items():
        layer.register_forward_pre_hook(hook(name, layer))
    noise = torch.randn(n, *sample_shape, generator=torch.Generator().manual_seed(123))
    ddim_sample(probe, noise, ddim_timesteps(steps, "quad"), make_betas("linear", 1e-4, 0.02).float())
    count = 1 if groups is None else groups.count
    layers = {}
    for name, s in stats.items():
        fmt = layer_format(model.get_submodule(name), config.act_format, config.act_bits)

        def scales(amax, fmt=fmt):
            return [activation_scale(torch.empty(0), float(v), fmt.bits, "minmax", fmt=fmt.format) for v in amax]

        per_group = [scales(s[f"act{g}" if groups else "act"]) for g in range(count)]
        layers[name] = LayerScales(
            act=per_group[0],
            warmup=None if s["warmup"] is None else scales(s["warmup"]),
            act_groups=None if groups is None else per_group,
            act_format=fmt.format,
        )
    return ScaleSet(modulate=config.modulate, layers=layers, source="test-absmax", step_groups=groups)


def tiny_model_config(model) -> DDIMModelConfig:
    return DDIMModelConfig("linear", 1e-4, 0.02, 1000, "tiny-test", "0" * 64, unet=model.config)


def export(tmp_path, model, config: QuantConfig, name="exp", step_groups: int = 1, **kwargs):
    """Export `model` with absmax scales from float trajectories; (reference qmodel, export dir)."""
    scales = absmax_scales(model, config, SHAPE, step_groups=step_groups) if config.act_bits else None
    static = QuantConfig(**{**config.to_dict(), "act_scales": "static" if config.act_bits else "dynamic"})
    qmodel = quantize_unet(model, static, scales)
    out = tmp_path / name
    cfg = tiny_model_config(model)
    if step_groups > 1:  # the export's sampler is the schedule the step groups are pinned to
        kwargs.setdefault("sampler", make_sampler(cfg, steps=len(SEQ), skip_type="quad"))
    export_model(model, qmodel, cfg, out, **kwargs)
    return qmodel, out


def trajectory(runner, noise):
    xs = []
    ddim_sample(runner, noise, SEQ, BETAS, callback=lambda i, t, x: xs.append(x.clone()))
    return torch.stack(xs)


def _expose_layer_inputs(step_path, layers):
    """Add each layer's input x (what the Sub node reads) as an extra graph output."""
    model = onnx.load(str(step_path))
    subs = {n.name.split("/")[0]: n.input[0] for n in model.graph.node if n.op_type == "Sub" and "/" in n.name}
    for layer in (name for name in layers if name in subs):  # constant-input layers have no residual
        model.graph.output.append(helper.make_tensor_value_info(f"x_of.{layer}", onnx.TensorProto.FLOAT, None))
        model.graph.node.append(helper.make_node("Identity", [subs[layer]], [f"x_of.{layer}"]))
    return model


def reference_feeds(qmodel, run) -> list[dict[str, np.ndarray]]:
    """The ONNX feeds (x, t[, context]) of every call the reference gets while `run(qmodel)` samples:
    realistic residual sizes at every step, for any sampler (DDIM, LDM DDIM, PLMS with guidance)."""
    feeds = []

    def record(module, args):
        names = ("x", "t", "context")
        feeds.append({n: a.detach().float().numpy().copy() for n, a in zip(names, args, strict=False) if a is not None})

    handle = qmodel.register_forward_pre_hook(record)
    try:
        run(qmodel)
    finally:
        handle.remove()
    return feeds


class OrtProbe:
    """`out`'s warm-up and (layer-input-exposing) step graphs on ONNX Runtime, state as graph I/O."""

    def __init__(self, out, layers, workdir=None):
        import onnxruntime as ort

        cpu, options = ["CPUExecutionProvider"], session_options()
        self.warm = ort.InferenceSession(str(out / "warmup.onnx"), options, providers=cpu)
        self.step_session = ort.InferenceSession(
            _expose_layer_inputs(out / "step.onnx", layers).SerializeToString(), options, providers=cpu
        )

    def warmup(self, feed) -> None:
        outs = dict(zip([o.name for o in self.warm.get_outputs()], self.warm.run(None, feed), strict=True))
        self.state = {output_to_input(n): v for n, v in outs.items() if n != "eps"}

    def step(self, feed):
        """(state read, outputs: a_hat_out.L, o_hat_out.L and each layer's input x_of.L)."""
        result = dict(
            zip(
                [o.name for o in self.step_session.get_outputs()],
                self.step_session.run(None, {**feed, **self.state}),
                strict=True,
            )
        )
        state, self.state = (
            self.state,
            {output_to_input(n): v for n, v in result.items() if n.startswith(("a_hat_out.", "o_hat_out."))},
        )
        return state, result


class OpenVinoProbe:
    """The same on OpenVINO, state kept as variables of the compiled step model and read back
    through `query_state` before and after each step: the runtime's own state, not a copy of it."""

    def __init__(self, out, layers, workdir):
        self.warm_path, self.step_path = out / "warmup.onnx", workdir / "probe-step.onnx"
        onnx.save(_expose_layer_inputs(out / "step.onnx", layers), str(self.step_path))

    def warmup(self, feed) -> None:
        from modiff_trt.engines.openvino_backend import (
            compile_graph,
            make_stateful,
            read_graph,
            seed_state,
        )

        batch = feed["x"].shape[0]
        warm = compile_graph(read_graph(self.warm_path, batch)).create_infer_request()
        model = read_graph(self.step_path, batch)
        make_stateful(model)
        self.request = compile_graph(model).create_infer_request()
        warm.infer(feed)
        seed_state(self.request, {n: warm.get_tensor(n).data for n in self.request_outputs(warm)})

    @staticmethod
    def request_outputs(request) -> list[str]:
        return [
            next(n for n in port.get_names() if n.startswith(("a_hat_out.", "o_hat_out.")))
            for port in request.model_outputs
            if "eps" not in port.get_names()
        ]

    def step(self, feed):
        from modiff_trt.engines.openvino_backend import read_state

        state = read_state(self.request)
        self.request.infer(feed)
        result = {
            n: self.request.get_tensor(n).data.copy()
            for port in self.request.model_outputs
            for n in port.get_names()
            if n.startswith("x_of.")
        }
        result.update({input_to_output(n): v for n, v in read_state(self.request).items()})
        return state, result


PROBES = {"ort": OrtProbe, "openvino": OpenVinoProbe}


def output_to_input(name: str) -> str:
    return name.replace("_out.", "_in.", 1)


def input_to_output(name: str) -> str:
    return name.replace("_in.", "_out.", 1)


def check_step_layers(out, qmodel, noise, run=None, runtime="ort", workdir=None) -> int:
    """Run `out`'s warm-up then step graphs on `runtime` (ort | openvino) along the reference's own
    sampler states and assert, per layer and step, on that runtime's own tensors: rq = a_hat_out -
    a_hat_in = Q(x - a_hat_in) exactly in the layer's own format (int grids: codes are integers
    in the b-bit range, and equal the reference's but at rounding ties), o_hat_out = o_hat_in +
    f(rq, Wq); constant-input layers carry no a_hat and pass o_hat through exactly. With step
    groups the step graph reads each call's `step_scale_ratio` row. `run(model)` samples
    (default: DDIM over SEQ from `noise`). Returns the number of (layer, step) pairs checked."""
    layers = qmodel.layers
    owners = {spec.name: spec.a_hat_owner for spec in load_manifest(out).layers if spec.a_hat_owner}
    probe = PROBES[runtime](out, layers, workdir)
    feeds = reference_feeds(qmodel, run or (lambda m: ddim_sample(m, noise, SEQ, BETAS)))
    probe.warmup(feeds[0])
    groups, table = qmodel.step_groups, step_ratio_table(qmodel)
    checked = 0
    for call, feed in enumerate(feeds[1:], start=1):
        group = None if groups is None else groups.group_of(call)
        extra = {} if group is None else {STEP_SCALE_RATIO: np.asarray(table[group], dtype=np.float32)}
        state, result = probe.step({**feed, **extra})
        for name, layer in layers.items():
            if layer.scales.constant_input:
                assert f"a_hat_out.{name}" not in result
                assert np.array_equal(result[f"o_hat_out.{name}"], state[f"o_hat_in.{name}"])
                checked += 1
                continue
            # a layer sharing an earlier layer's a_hat reads (and advances) that one's
            source = owners.get(name, name)
            if source != name:
                assert f"a_hat_out.{name}" not in result and f"a_hat_in.{name}" not in state
            a_in, o_in = torch.from_numpy(state[f"a_hat_in.{source}"]), torch.from_numpy(state[f"o_hat_in.{name}"])
            a_out, o_out = (
                torch.from_numpy(result[f"a_hat_out.{source}"]),
                torch.from_numpy(result[f"o_hat_out.{name}"]),
            )
            # a_hat's own rounding bounds rq = a_out - a_in: float32's, or fp16's under the scaled layout,
            # where the warm-up's fractional part of A rounds as |A| grows (the integer codes add exactly)
            eps = torch.finfo(a_out.dtype).eps
            unit = layer.state_unit()  # state_layout 'scaled': the runtime carries A = a_hat / unit
            if unit is not None:
                a_in, a_out = a_in.float() * unit, a_out.float() * unit
            residual = torch.from_numpy(result[f"x_of.{name}"]) - a_in
            rq = a_out - a_in
            layer.step_ratio = None if group is None else layer.ratios[group]
            want = layer.quantize_step_input(residual)
            # rq is read back as a_out - a_in: float32 rounding of a_hat bounds its precision
            ulp = 2 * eps * float(a_out.abs().max())
            tie = torch.zeros_like(want, dtype=torch.bool)  # FP8 / NVFP4 Q/DQ run bit-exact on ORT
            on_grid = rq.clone()
            slack = 0.0
            for i, g in enumerate(layer.groups if len(layer.groups) > 1 else [slice(None)]):
                if layer.format.format != "int":
                    continue
                scale = torch.tensor(layer.scales.act[i])
                pre, post = (1.0, 1.0) if group is None else (torch.tensor(r[i]) for r in layer.ratios[group])
                zp = 0.0 if layer.scales.act_zero_point is None else float(layer.scales.act_zero_point[i])
                # ORT rounds ties to even, OpenVINO away from zero, and either may round a code within
                # a float32 ulp of a tie the other way
                ratio = residual[:, g] * pre / scale
                tie[:, g] = (ratio - ratio.floor() - 0.5).abs() < 1e-3
                slack = max(slack, 1e-5 * float(scale) * float(post) * 128)
                # codes on the b-bit grid of the constant scale
                codes = rq[:, g] / post / scale
                assert (codes - codes.round()).abs().max() <= 1e-3 + ulp / float(scale * post), f"{name}: off the grid"
                lo, hi = -(2 ** (layer.act_bits - 1)) - zp, 2 ** (layer.act_bits - 1) - 1 - zp
                assert lo <= codes.round().min() and codes.round().max() <= hi, f"{name}: codes outside [{lo}, {hi}]"
                on_grid[:, g] = codes.round() * scale * post
            assert torch.allclose(rq[~tie], want[~tie], atol=ulp + slack, rtol=0), name
            # f from the codes themselves: the ulps a_out - a_in carries would add up over the kernel
            f = layer.apply_weight(on_grid, bias=False)
            # an fp16 o_hat rounds o_out itself: its ulp joins the float32 kernel's
            o_eps = 1e-5 + 2 * torch.finfo(o_out.dtype).eps * (o_out.dtype != torch.float32)
            o_in, o_out = o_in.float(), o_out.float()
            assert torch.allclose(o_out - o_in, f, rtol=1e-4, atol=o_eps * float(o_out.abs().max())), name
            checked += 1
    return checked
