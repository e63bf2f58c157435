"""Issue 22: the MoDiff step with its state in fewer bytes, on OpenVINO and ONNX Runtime.

The full-size CIFAR-10 UNet (random weights, W8A8 with `speed.py`'s dummy static scales),
trt-style graphs. OpenVINO rows keep the state in the compiled step model's variables (the
`openvino` backend); ORT rows pass it as graph I/O (the `ort` backend). Each MoDiff row is one
state layout: fp32, fp16, and fp16 in the scaled layout (a_hat in units of its residual scale);
every export carries one a_hat per input tensor. Rows are timed in turn, as in `speed.py`.
Run: `python benchmarks/state_speed.py` (writes the `state-speed` section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from report import command_line, machine, markdown_table, write_section
from speed import Variant, float_pass_absmax, measure, ort_float_graph, ov_float_graph, runner_step, scale_set

from modiff_trt.engines.openvino_backend import OpenVinoRunner
from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.export.exporter import export_model
from modiff_trt.export.manifest import Manifest
from modiff_trt.export.onnx_float import export_float_onnx
from modiff_trt.models import load_config, load_unet
from modiff_trt.quant import QuantConfig, quantize_unet

LAYOUTS = {  # key: (state dtype, state layout, label)
    "fp32": ("float32", "plain", "fp32 state"),
    "fp16": ("float16", "plain", "fp16 state"),
    "scaled": ("float16", "scaled", "fp16 state, scaled layout"),
}


def export_layouts(model, cfg, absmax, work: Path) -> tuple[dict[str, Path], dict[str, Manifest]]:
    """The float graph, the plain INT8 export and one MoDiff export per layout."""
    import onnx

    paths: dict[str, Path] = {"float": work / "float.onnx"}
    graph = export_float_onnx(model, cfg.sample_shape, 17, None)
    graph.ir_version = min(graph.ir_version, 10)
    onnx.save(graph, str(paths["float"]))
    manifests = {}
    configs = {"plain": QuantConfig(8, 8, modulate=False, act_scales="static")}
    for key, (dtype, layout, _) in LAYOUTS.items():
        configs[key] = QuantConfig(8, 8, act_scales="static", state_dtype=dtype, state_layout=layout)
    for key, config in configs.items():
        qmodel = quantize_unet(model, config, scale_set(absmax, config.modulate))
        paths[key] = work / key
        manifests[key] = export_model(model, qmodel, cfg, paths[key])
    return paths, manifests


def rows(paths: dict[str, Path], threads: int) -> list[Variant]:
    def ov(key: str):
        return runner_step(lambda: OpenVinoRunner(paths[key], threads=threads), key != "plain")

    def ort_step(key: str):
        return runner_step(lambda: OrtRunner(paths[key], provider="cpu", threads=threads), True)

    table = [
        Variant("ort-float", "ORT fp32 (float graph)", ort_float_graph(paths["float"], threads)),
        Variant("ov-float", "OpenVINO fp32 (float graph)", ov_float_graph(paths["float"], threads)),
        Variant("ov-plain", "OpenVINO INT8 plain (unet.onnx)", ov("plain")),
    ]
    table += [Variant(f"ov-{k}", f"OpenVINO INT8 MoDiff step, {v[2]}", ov(k)) for k, v in LAYOUTS.items()]
    table += [Variant(f"ort-{k}", f"ORT INT8 MoDiff step, {v[2]}", ort_step(k)) for k, v in LAYOUTS.items()]
    return table


def report(table, results, batches, loads, manifests, args) -> str:
    header = ["runtime / graph"] + [f"batch {n} (ms/step)" for n in batches]
    body = [[v.label] + [f"{results[v.key][n]:.1f}" for n in batches] for v in table]
    b = 8 if 8 in batches else batches[-1]
    state = [
        [LAYOUTS[k][2], f"{manifests[k].state_bytes_per_sample() / 2**20:.1f} MiB"]
        + [f"{2 * n * manifests[k].state_bytes_per_sample() / 2**20:.0f} MiB" for n in batches]
        for k in LAYOUTS
    ]
    goals = []
    for k in LAYOUTS:
        overhead = results[f"ov-{k}"][b] / results["ov-plain"][b] - 1
        speedup = results["ort-float"][b] / results[f"ov-{k}"][b]
        goals.append([LAYOUTS[k][2], f"{overhead * 100:+.0f}%", f"{speedup:.2f}x"])
    lines = [
        "## MoDiff step speed by state layout (issue 22)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}; intra-op threads = {args.threads}. Load average (1/5/15 min) after each batch: "
        + "; ".join(f"b{k}: {v}" for k, v in loads.items())
        + ".",
        "",
        "Full-size DDIM CIFAR-10 UNet, random weights, W8A8 with dummy static scales (as `speed.py`), trt-style "
        "graphs, one a_hat per input tensor. OpenVINO rows keep the state in the step model's variables, ORT "
        "rows pass it as graph I/O. Median of the timed calls after one warm-up call, rows timed in turn. On a "
        "CPU without VNNI OpenVINO's 8-bit-weight kernels are not exact (docs/openvino.md): the OpenVINO "
        "rows are timings of the same graphs, not of a deployable exact path on such a CPU.",
        "",
        markdown_table(header, body),
        "",
        markdown_table(["state", "per sample"] + [f"batch {n} (x2 ping-pong sets)" for n in batches], state),
        "",
        f"Issue 22's OpenVINO goals at batch {b}: MoDiff step overhead over plain INT8 <= 10%, MoDiff step >= 2.2x "
        "ORT fp32.",
        "",
        markdown_table(["state", "overhead over OpenVINO plain INT8", "speed-up vs ORT fp32"], goals),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per cell")
    parser.add_argument("--threads", type=int, default=2, help="torch, ORT and OpenVINO intra-op threads")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("ddim-cifar10")
    model = load_unet(cfg, None).eval()
    absmax, _ = float_pass_absmax(model, tuple(cfg.sample_shape))
    results: dict[str, dict[int, float]] = {}
    loads: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        paths, manifests = export_layouts(model, cfg, absmax, Path(tmp))
        table = rows(paths, args.threads)
        for batch in args.batches:
            x, t = torch.randn(batch, *cfg.sample_shape), torch.full((batch,), 500.0)
            steps = {v.key: v.setup(x, t) for v in table}
            for key, ms in measure(steps, 1, args.repeats).items():
                results.setdefault(key, {})[batch] = ms
            del steps
            loads[batch] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    body = report(table, results, args.batches, loads, manifests, args)
    print(body)
    if not args.no_write:
        write_section("state-speed", body)


if __name__ == "__main__":
    main()
