"""A full-size MoDiff step graph on ONNX Runtime, checked per layer on ORT's own tensors (issue 21).

The test suite proves the per-layer invariants on small models; this script shows them on a
full-size export (SD v1: 860 M parameters, batch 2 under guidance), which CI's time does not
allow. It runs the export's warm-up graph, one DDIM update, then the step graph with a sample of
layers' inputs exposed as extra outputs, and checks for each sampled layer:

- codes: rq = a_hat_out - a_hat_in is a multiple of the layer's step scale s on the b-bit grid;
- rounding: the codes equal round(clip((x - a_hat_in) / s)) except where the residual sits on a
  rounding tie (half-way between two codes, within float32 noise);
- o_hat: o_hat_out - o_hat_in = Op(rq, Wq), with Wq the graph's own int8 weights x scales.

Nothing needs the torch model: scales come from the manifest and weights from the graph, so the
check costs only the ORT sessions. Run:
`python benchmarks/full_size_step.py EXPORT_DIR [--layers 12] [--json out.json]` on an export
made with `--target trt --float fp32` and plain fp32 state (the layout the check reads); it writes
BENCHMARKS.md section `issue21-step-check` (`--from-json` re-writes it from a saved report).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from report import command_line, markdown_table, write_section

from modiff_trt.engines.ort_backend import session_options
from modiff_trt.export import naming
from modiff_trt.export.manifest import LayerSpec, load_manifest
from modiff_trt.machine import describe_machine
from modiff_trt.quant.quantizers import int_range
from modiff_trt.sampling.schedules import alphas_cumprod

log = logging.getLogger("full_size_step")
PROBE_NAME = ".probe-step.onnx"


def sample_layers(layers: list[LayerSpec], count: int) -> list[LayerSpec]:
    """`count` quantized layers spread evenly over the UNet (input to output), each kind present."""
    candidates = [layer for layer in layers if layer.act_scale and not layer.constant_input]
    picks = np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().astype(int)
    return [candidates[i] for i in sorted(set(picks))]


def _layer_nodes(graph: onnx.GraphProto, name: str) -> tuple[str, onnx.NodeProto, str, str]:
    """(layer input x, the layer's Conv/Gemm/MatMul node, its int8 weight and weight-scale names)."""
    prefix = f"{name}/"
    nodes = [n for n in graph.node if n.name.startswith(prefix)]
    sub = next(n for n in nodes if n.op_type == "Sub")
    op = next(n for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul"))
    dq = next(n for n in nodes if n.op_type == "DequantizeLinear" and "/w_int8_" in n.input[0])
    return sub.input[0], op, dq.input[0], dq.input[1]


def probe_graph(step: Path, layers: list[LayerSpec], probe: Path) -> dict[str, dict]:
    """Write `probe`: the step graph with each sampled layer's input as output `x_of.<layer>` (same
    external data), and return what the check needs per layer."""
    model = onnx.load(str(step), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for layer in layers:
        x, op, weight, scale = _layer_nodes(model.graph, layer.name)
        model.graph.output.append(helper.make_tensor_value_info(f"x_of.{layer.name}", onnx.TensorProto.FLOAT, None))
        model.graph.node.append(helper.make_node("Identity", [x], [f"x_of.{layer.name}"]))
        attrs = {a.name: helper.get_attribute_value(a) for a in op.attribute}
        found[layer.name] = {"op": op.op_type, "attrs": attrs, "weight": inits[weight], "scale": inits[scale]}
    onnx.save(model, str(probe))
    return found


def apply_op(op: str, attrs: dict, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Op(x, w) without bias, as the graph node computes it (fp64, so the check's own rounding is nil)."""
    if op in ("Gemm", "MatMul"):
        return x @ w.T
    pads = attrs.get("pads", [0] * 2 * (w.dim() - 2))
    if pads[: len(pads) // 2] != pads[len(pads) // 2 :]:
        raise ValueError(f"asymmetric pads {pads} are not handled by this check")
    conv = F.conv2d if w.dim() == 4 else F.conv1d
    return conv(
        x, w, None, attrs.get("strides", 1), pads[: len(pads) // 2], attrs.get("dilations", 1), attrs.get("group", 1)
    )


def check_layer(layer: LayerSpec, info: dict, base: Path, x, a_in, a_out, o_in, o_out) -> dict:
    """The three invariants of one layer at one step, as counts and worst errors."""
    s = float(layer.act_scale[0])
    lo, hi = int_range(layer.act_bits)
    codes = (a_out.astype(np.float64) - a_in) / s
    off_grid = np.abs(codes - np.round(codes))
    want = np.clip((x.astype(np.float64) - a_in) / s, lo, hi)
    tie = np.abs(np.abs(want - np.floor(want)) - 0.5) < 1e-4
    differs = (np.round(codes) != np.round(want)) & ~tie
    w_int = numpy_helper.to_array(info["weight"], str(base)).astype(np.float64)
    w_scale = numpy_helper.to_array(info["scale"], str(base)).astype(np.float64)
    w = torch.from_numpy(w_int * w_scale.reshape(-1, *[1] * (w_int.ndim - 1)))
    f = apply_op(info["op"], info["attrs"], torch.from_numpy(np.round(codes) * s), w).numpy()
    gain = o_out.astype(np.float64) - o_in
    return {
        "layer": layer.name,
        "kind": layer.kind,
        "elements": int(codes.size),
        "worst_off_grid": float(off_grid.max()),
        "codes_in_range": bool(np.round(codes).min() >= lo and np.round(codes).max() <= hi),
        "nonzero_codes": int(np.count_nonzero(np.round(codes))),
        "codes_differing_not_at_ties": int(differs.sum()),
        "ties": int(tie.sum()),
        "o_hat_rel_err": float(np.abs(gain - f).max() / max(np.abs(f).max(), 1e-30)),
    }


def ddim_next(x: np.ndarray, eps: np.ndarray, a_t: float, a_prev: float) -> np.ndarray:
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps).astype(np.float32)


def run(export_dir: Path, count: int, seed: int) -> dict:
    import onnxruntime as ort

    manifest = load_manifest(export_dir)
    if manifest.export.float_dtype != "float32" or manifest.export.state_dtype != "float32":
        raise SystemExit(f"{export_dir}: this check reads fp32 graphs with fp32 state; export with --float fp32")
    layers = sample_layers(manifest.layers, count)
    timesteps = manifest.sampling.timesteps()  # increasing: a trajectory starts at the last
    t0, t1 = timesteps[-1], timesteps[-2]
    alphas = alphas_cumprod(manifest.sampling.schedule.betas()).double().numpy()
    rng = np.random.default_rng(seed)
    batch = manifest.export.state_batch_multiplier  # guidance: cond + uncond rows of one image
    x = np.repeat(rng.standard_normal((1, *manifest.model.sample_shape), dtype=np.float32), batch, axis=0)
    feed = {naming.X: x, naming.T: np.full((batch,), t0, dtype=np.float32)}
    if manifest.model.context_shape is not None:
        feed[naming.CONTEXT] = rng.standard_normal((batch, *manifest.model.context_shape), dtype=np.float32)
    options, cpu = session_options(), ["CPUExecutionProvider"]
    timings = {}
    started = time.perf_counter()
    warm = ort.InferenceSession(str(export_dir / manifest.graphs["warmup"].file), options, providers=cpu)
    timings["warmup_session_s"] = time.perf_counter() - started
    started = time.perf_counter()
    outs = dict(zip([o.name for o in warm.get_outputs()], warm.run(None, feed), strict=True))
    timings["warmup_call_s"] = time.perf_counter() - started
    del warm
    state = {k.replace("_out.", "_in.", 1): v for k, v in outs.items() if k != naming.EPS}
    eps = outs[naming.EPS]
    feed[naming.X] = ddim_next(x, eps, alphas[t0], alphas[t1])
    feed[naming.T] = np.full((batch,), t1, dtype=np.float32)
    # The probe graph sits beside step.onnx for the run, so it finds the same `step.onnx.data`.
    probe = export_dir / PROBE_NAME
    try:
        info = probe_graph(export_dir / manifest.graphs["step"].file, layers, probe)
        started = time.perf_counter()
        step = ort.InferenceSession(str(probe), options, providers=cpu)
        timings["step_session_s"] = time.perf_counter() - started
        started = time.perf_counter()
        result = dict(zip([o.name for o in step.get_outputs()], step.run(None, {**feed, **state}), strict=True))
        timings["step_call_s"] = time.perf_counter() - started
    finally:
        probe.unlink(missing_ok=True)
    checks = [
        check_layer(
            layer,
            info[layer.name],
            export_dir,
            result[f"x_of.{layer.name}"],
            state[f"a_hat_in.{layer.name}"],
            result[f"a_hat_out.{layer.name}"],
            state[f"o_hat_in.{layer.name}"],
            result[f"o_hat_out.{layer.name}"],
        )
        for layer in layers
    ]
    return {
        "export": str(export_dir),
        "machine": describe_machine(),
        "batch": batch,
        "timesteps": [t0, t1],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "layers": checks,
    }


def write_report(report: dict, section: str, command: str) -> None:
    """The per-layer table of `report` as BENCHMARKS.md section `section`."""
    rows = [
        [
            f"`{r['layer']}`",
            r["kind"],
            f"{r['elements']:,}",
            f"{r['nonzero_codes']:,}",
            f"{r['worst_off_grid']:.1e}",
            "yes" if r["codes_in_range"] else "**no**",
            str(r["codes_differing_not_at_ties"]),
            str(r["ties"]),
            f"{r['o_hat_rel_err']:.1e}",
        ]
        for r in report["layers"]
    ]
    table = markdown_table(
        [
            "layer",
            "kind",
            "elements",
            "nonzero codes",
            "worst off-grid (codes)",
            "in range",
            "codes != rounding, not at a tie",
            "ties (within 1e-4 of .5)",
            "o_hat gain rel. error",
        ],
        rows,
    )
    t = report["timings"]
    write_section(
        section,
        "### A full-size step graph on ONNX Runtime, checked per layer\n\n"
        f"Command: `{command}`  \nMachine: {report['machine']}.\n\n"
        f"Export `{report['export']}`: warm-up at t={report['timesteps'][0]}, one DDIM update, the step graph at "
        f"t={report['timesteps'][1]}, batch {report['batch']} (one image under guidance). ORT CPU: warm-up session "
        f"{t['warmup_session_s']} s + call {t['warmup_call_s']} s, step session {t['step_session_s']} s + call "
        f"{t['step_call_s']} s (shared machine). Per sampled layer, on ORT's own tensors: the residual codes "
        "(a_hat_out - a_hat_in) / s, their distance from an integer, whether they equal round((x - a_hat_in) / s) "
        "clipped, and o_hat_out - o_hat_in against Op(codes x s, the graph's int8 weights x scales) in fp64.\n\n"
        + table,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, nargs="?")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also save the report here")
    parser.add_argument("--from-json", type=Path, help="write the table of a saved report instead of running")
    parser.add_argument("--section", default="issue21-step-check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        command = report["command"]
    else:
        report = run(args.export_dir, args.layers, args.seed)
        command = report["command"] = command_line()
    for row in report["layers"]:
        log.info(
            "%-60s %-7s off-grid %.1e  differing %d (ties %d)  nonzero %d/%d  o_hat rel err %.1e",
            row["layer"], row["kind"], row["worst_off_grid"], row["codes_differing_not_at_ties"], row["ties"],
            row["nonzero_codes"], row["elements"], row["o_hat_rel_err"],
        )  # fmt: skip
    log.info("timings: %s", report["timings"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    write_report(report, args.section, command)


if __name__ == "__main__":
    main()
