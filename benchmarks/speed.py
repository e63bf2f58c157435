"""Per-step UNet latency on CPU, every runtime side by side in one run -> BENCHMARKS.md `speed`.

The full-size DDIM CIFAR-10 UNet (35.7M parameters, random weights: speed does not depend on
them) at several batch sizes. Scales are dummy absmax values from one float pass (speed does not
depend on them either). Rows: torch fp32 eager, ORT fp32 (the float graph), ORT INT8 plain and
MoDiff step for the TensorRT-style graphs (`--target trt`) and the CPU integer graphs
(`--target ort-cpu`), each MoDiff step graph of ORT again with step groups (its
`step_scale_ratio` input), OpenVINO fp32, plain INT8 and MoDiff step on the TensorRT-style graphs
(state kept in the compiled model's variables, and state as graph I/O for comparison), and the
seed demo's torch.ao native-int8 MoDiff in eager. For MoDiff the
warm-up (first) step runs first and only later steps are timed: those are what a trajectory
repeats. Median of >= 5 timed calls after warm-up calls, the rows timed in turn (round-robin).

    python benchmarks/speed.py            # full run, writes the `speed` section of BENCHMARKS.md
    python benchmarks/speed.py --quick    # smoke run: batch 1, few calls, prints only
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from report import command_line, machine, markdown_table, write_section
from torch_native import native_modiff_unet, reset

from modiff_trt.engines.openvino_backend import (
    OpenVinoRunner,
    compile_graph,
    read_graph,
)
from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.export.exporter import export_model
from modiff_trt.export.manifest import Manifest
from modiff_trt.export.onnx_float import export_float_onnx
from modiff_trt.models import load_config, load_unet
from modiff_trt.quant import LayerScales, QuantConfig, ScaleSet, quantize_unet
from modiff_trt.quant.model import quantizable_layers
from modiff_trt.quant.scales import StepGroups
from modiff_trt.sampling.sampler import make_sampler

RESIDUAL_FRACTION = 0.05  # dummy MoDiff residual range: a few percent of the activation's
STEP_GROUPS = 4  # the step-group variants: residual scales per 4 groups of a 50-step schedule
# Two more MoDiff states at batch 32 (2 x 2.7 GB with ping-pong buffers) ran a 23 GB machine out of memory
STEP_GROUPS_MAX_BATCH = 8


Setup = Callable[[torch.Tensor, torch.Tensor], Callable[[], object]]  # (x, t) -> one timed step


@dataclass
class Variant:
    key: str
    label: str
    setup: Setup
    max_batch: int | None = None  # not timed at larger batches: every row's state is alive during a round


def float_pass_absmax(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[dict[str, float], dict[str, float]]:
    """Input and output absmax of every Conv/Linear over one float call (dummy calibration)."""
    names = quantizable_layers(model)
    inputs: dict[str, float] = {}
    outputs: dict[str, float] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            inputs[name], outputs[name] = float(args[0].abs().max()), float(output.abs().max())

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    with torch.inference_mode():
        model(torch.randn(2, *shape), torch.full((2,), 500.0))
    for h in hooks:
        h.remove()
    return inputs, outputs


def scale_set(absmax: dict[str, float], modulate: bool, groups: StepGroups | None = None) -> ScaleSet:
    """Dummy scales; with `groups`, residual scales halving from one step group to the next."""
    fraction = RESIDUAL_FRACTION if modulate else 1.0
    layers = {}
    for name, v in absmax.items():
        act = [max(v * fraction, 1e-6) / 127]
        per_group = None if groups is None else [[act[0] / 2**g] for g in range(groups.count)]
        layers[name] = LayerScales(act=act, act_groups=per_group)
    return ScaleSet(modulate=modulate, layers=layers, source="speed-dummy-absmax", step_groups=groups)


def export_all(model, cfg, absmax, work: Path) -> tuple[dict[str, Path], dict[str, float], dict[str, Manifest]]:
    """Float graph + {trt, ort-cpu} x {plain, modiff, modiff with step groups} exports; paths, export
    seconds, manifests."""
    paths, seconds, manifests = {}, {}, {}
    started = time.perf_counter()
    graph = export_float_onnx(model, cfg.sample_shape, 17, None)
    graph.ir_version = min(graph.ir_version, 10)
    paths["float"] = work / "float.onnx"
    onnx.save(graph, str(paths["float"]))
    seconds["float"] = time.perf_counter() - started
    sampler = make_sampler(cfg, steps=50)
    groups = StepGroups.even(STEP_GROUPS, sampler.timesteps(), sampler.skip_type)
    for target in ("trt", "ort-cpu"):
        for modulate, step_groups in ((False, None), (True, None), (True, groups)):
            key = f"{target}-{'modiff' if modulate else 'plain'}{'-g' if step_groups else ''}"
            qmodel = quantize_unet(
                model,
                QuantConfig(8, 8, modulate=modulate, act_scales="static"),
                scale_set(absmax, modulate, step_groups),
            )
            started = time.perf_counter()
            manifests[key] = export_model(model, qmodel, cfg, work / key, sampler=sampler, target=target)
            seconds[key] = time.perf_counter() - started
            paths[key] = work / key
            print(f"exported {key} in {seconds[key]:.1f} s", flush=True)
    return paths, seconds, manifests


def state_bytes_per_sample(manifest: Manifest) -> int:
    """a_hat + o_hat of every layer for one sample, in the state dtype (one set; ping-pong holds two)."""
    item = np.dtype(manifest.export.state_dtype).itemsize
    return sum((math.prod(layer.a_hat_shape) + math.prod(layer.o_hat_shape)) * item for layer in manifest.layers)


def ort_float_graph(path: Path, threads: int) -> Setup:
    """The float graph on ONNX Runtime with its default graph optimizations."""

    def setup(x, t):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {"x": x.numpy(), "t": t.numpy()}
        return lambda: session.run(None, feeds)

    return setup


def ov_float_graph(path: Path, threads: int) -> Setup:
    """The float graph compiled by OpenVINO for the call's batch."""

    def setup(x, t):
        request = compile_graph(read_graph(path, x.shape[0]), threads).create_infer_request()
        return lambda: request.infer({"x": x.numpy(), "t": t.numpy()})

    return setup


def runner_step(make: Callable[[], Callable], modulated: bool) -> Setup:
    """A runner's call after a reset; a MoDiff runner gets one untimed call first: the warm-up graph
    creates the state (or seeds OpenVINO's variables), so the timed calls run step.onnx."""

    def setup(x, t):
        runner = make()
        runner.reset_state()
        if modulated:
            runner(x, t)
        return lambda: runner(x, t)

    return setup


def variants(model, paths, absmax, out_absmax, threads: int) -> list[Variant]:
    def torch_eager(x, t):
        return lambda: model(x, t)

    ort_float, ov_float = ort_float_graph(paths["float"], threads), ov_float_graph(paths["float"], threads)

    def ort_runner(key: str) -> Setup:
        return runner_step(lambda: OrtRunner(paths[key], provider="cpu", threads=threads), "modiff" in key)

    def ov_runner(key: str) -> Setup:
        return runner_step(lambda: OpenVinoRunner(paths[key], threads=threads), "modiff" in key)

    def ov_state_io(x, t):
        """The step graph compiled as exported: 2 x 113 state tensors cross the API every call."""
        batch, export = x.shape[0], paths["trt-modiff"]
        warm = compile_graph(read_graph(export / "warmup.onnx", batch), threads).create_infer_request()
        request = compile_graph(read_graph(export / "step.onnx", batch), threads).create_infer_request()
        warm.infer({"x": x.numpy(), "t": t.numpy()})
        feeds = {"x": x.numpy(), "t": t.numpy()}
        for port in request.model_inputs:
            name = next(n for n in port.get_names() if n.startswith(("a_hat_in.", "o_hat_in.")) or n in feeds)
            if name not in feeds:
                feeds[name] = warm.get_tensor(name.replace("_in.", "_out.", 1)).data.copy()
        return lambda: request.infer(feeds)

    def native(x, t):
        unet = native_modiff_unet(
            model,
            {n: max(v * RESIDUAL_FRACTION, 1e-6) / 127 for n, v in absmax.items()},
            {n: max(v * RESIDUAL_FRACTION, 1e-6) / 127 for n, v in out_absmax.items()},
        )
        reset(unet)
        unet(x, t)  # float warm-up step
        return lambda: unet(x, t)

    return [
        Variant("torch-fp32", "torch fp32 eager", torch_eager),
        Variant("ort-fp32", "ORT fp32 (float graph)", ort_float),
        Variant("trt-plain", "ORT INT8 plain, trt-style Q/DQ (unet.onnx)", ort_runner("trt-plain")),
        Variant("trt-modiff", "ORT INT8 MoDiff step, trt-style Q/DQ (step.onnx)", ort_runner("trt-modiff")),
        Variant(
            "trt-modiff-g",
            f"ORT INT8 MoDiff step, trt-style Q/DQ, {STEP_GROUPS} step groups (step_scale_ratio)",
            ort_runner("trt-modiff-g"),
            max_batch=STEP_GROUPS_MAX_BATCH,
        ),
        Variant("ort-cpu-plain", "ORT INT8 plain, ort-cpu target (ConvInteger)", ort_runner("ort-cpu-plain")),
        Variant("ort-cpu-modiff", "ORT INT8 MoDiff step, ort-cpu target (ConvInteger)", ort_runner("ort-cpu-modiff")),
        Variant(
            "ort-cpu-modiff-g",
            f"ORT INT8 MoDiff step, ort-cpu target, {STEP_GROUPS} step groups (step_scale_ratio)",
            ort_runner("ort-cpu-modiff-g"),
            max_batch=STEP_GROUPS_MAX_BATCH,
        ),
        Variant("ov-fp32", "OpenVINO fp32 (float graph)", ov_float),
        Variant("ov-plain", "OpenVINO INT8 plain, trt-style Q/DQ (unet.onnx)", ov_runner("trt-plain")),
        Variant(
            "ov-modiff",
            "OpenVINO INT8 MoDiff step, trt-style, state in variables (backend `openvino`)",
            ov_runner("trt-modiff"),
        ),
        Variant("ov-modiff-io", "OpenVINO INT8 MoDiff step, trt-style, state as graph I/O", ov_state_io),
        Variant(
            "torch-native",
            "seed demo: torch.ao quantized conv/linear + float MoDiff state, eager "
            "(output requantized to int8: not exact)",
            native,
        ),
    ]


def measure(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per step of `repeats` rounds after `warmup` untimed calls of each.

    A round times one call of every step in turn, so load from other work on a shared machine
    falls on every row alike instead of on whichever row happened to run while it lasted.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            time.sleep(0.1)  # the previous row's spinning worker threads go idle first
            started = time.perf_counter()
            step()
            times[key].append((time.perf_counter() - started) * 1000)
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 5 calls; print, do not write BENCHMARKS.md")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per cell (batch >= 32: 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch, ORT and OpenVINO intra-op threads")
    args = parser.parse_args(argv)
    batches = [1] if args.quick else args.batches
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("ddim-cifar10")
    model = load_unet(cfg, None).eval()
    absmax, out_absmax = float_pass_absmax(model, tuple(cfg.sample_shape))
    results: dict[str, dict[int, float]] = {}
    loads: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        paths, export_seconds, manifests = export_all(model, cfg, absmax, Path(tmp))
        rows = variants(model, paths, absmax, out_absmax, args.threads)
        for batch in batches:
            repeats = 5 if args.quick or batch >= 32 else max(5, args.repeats)
            x = torch.randn(batch, *cfg.sample_shape)
            t = torch.full((batch,), 500.0)
            steps = {v.key: v.setup(x, t) for v in rows if v.max_batch is None or batch <= v.max_batch}
            for key, ms in measure(steps, 1, repeats).items():
                results.setdefault(key, {})[batch] = ms
                print(f"batch {batch:>2} {key:<15} {ms:9.1f} ms", flush=True)
            del steps
            loads[batch] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    body = report(rows, results, batches, loads, export_seconds, manifests, args)
    print(body)
    if not args.quick:
        write_section("speed", body)


def _ratio(results, num: str, den: str, batch: int) -> float:
    return results[num][batch] / results[den][batch]


def report(rows, results, batches, loads, export_seconds, manifests, args) -> str:
    b = 8 if 8 in batches else batches[-1]  # the speed goals are stated at batch 8
    header = ["runtime / graph"] + [f"batch {n} (ms/step)" for n in batches] + [f"speed-up vs ORT fp32 @ b{b}"]
    table = [
        [v.label]
        + [f"{results[v.key][n]:.1f}" if n in results[v.key] else "-" for n in batches]
        + [f"{_ratio(results, 'ort-fp32', v.key, b):.2f}x"]
        for v in rows
    ]
    lines = [
        "## Speed: per-step UNet latency on CPU",
        "",
        f"Command: `{command_line()}`  ",
        (
            f"Machine: {machine()}; torch, ORT and OpenVINO intra-op threads = {args.threads}, ORT default graph "
            "optimizations and thread spinning, OpenVINO CPU plugin with f32 inference precision and the latency "
            "hint. The cores are shared with other work: load average "
            f"(1/5/15 min) after each batch: {'; '.join(f'b{k}: {v}' for k, v in loads.items())}."
        ),
        "",
        (
            "Full-size DDIM CIFAR-10 UNet (35.7M params, 113 Conv/Linear), random weights, W8A8 with "
            "dummy static scales, fp warm-up. Median of >= 5 timed calls after one warm-up call "
            "(batch 32: 5 calls), the rows timed in turn (one call of each per round, so load from other "
            "work falls on every row alike); MoDiff rows time later steps (the warm-up graph runs once before). "
            f"Step-group rows: the same step graph with a `step_scale_ratio` input ({STEP_GROUPS} groups of dummy "
            "scales; three Muls per quantizer: the residual before Q, the dequantized residual, the layer output), "
            f"timed up to batch {STEP_GROUPS_MAX_BATCH} (two more states at batch 32 exceed this machine's memory)."
        ),
        "",
        markdown_table(header, table),
        "",
        "| MoDiff state | per sample | per batch 8 (x2 ping-pong buffers) |",
        "|---|---|---|",
    ]
    state = state_bytes_per_sample(manifests["trt-modiff"])
    lines.append(f"| a_hat + o_hat, 113 layers, fp32 | {state / 2**20:.1f} MiB | {2 * 8 * state / 2**20:.0f} MiB |")
    lines += [
        "",
        "Export time (`float`: the float trace alone; the others: `export_model` = float trace + Q/DQ pass "
        "+ ONNX full check + save): " + ", ".join(f"{k} {v:.1f} s" for k, v in export_seconds.items()) + ".",
        "",
    ]
    targets = [
        ("ORT INT8 MoDiff step vs ORT fp32", ">= 2.5x", "ort-fp32", "modiff", False),
        ("ORT INT8 MoDiff step vs torch fp32 eager", ">= 3x", "torch-fp32", "modiff", False),
        ("MoDiff step overhead over plain INT8", "<= 15%", "modiff", "plain", True),
        (
            f"step_scale_ratio ({STEP_GROUPS} step groups) overhead over the same step graph",
            "<= 5%",
            "modiff-g",
            "modiff",
            True,
        ),
    ]
    overheads = "; ".join(
        f"b{n}: "
        + ", ".join(
            f"{t} {(_ratio(results, f'{t}-modiff-g', f'{t}-modiff', n) - 1) * 100:+.1f}%" for t in ("trt", "ort-cpu")
        )
        for n in batches
        if n in results["trt-modiff-g"]
    )
    lines += [
        f"`step_scale_ratio` overhead over the same step graph, per batch: {overheads}.",
        "",
        f"Speed goals at batch {b}:",
        "",
        "| target | goal | trt-style graph | ort-cpu graph |",
        "|---|---|---|---|",
    ]
    for name, goal, num, den, overhead in targets:
        cells = []
        for target in ("trt", "ort-cpu"):
            n = f"{target}-{num}" if num.startswith(("modiff", "plain")) else num
            d = f"{target}-{den}" if den.startswith(("modiff", "plain")) else den
            r = _ratio(results, n, d, b)
            cells.append(f"{(r - 1) * 100:+.0f}%" if overhead else f"{r:.2f}x")
        lines.append(f"| {name} | {goal} | {cells[0]} | {cells[1]} |")
    ov = [
        ("OpenVINO INT8 MoDiff step vs ORT fp32", ">= 2.0x", _ratio(results, "ort-fp32", "ov-modiff", b), False),
        (
            "OpenVINO INT8 MoDiff step vs torch fp32 eager",
            ">= 2.5x",
            _ratio(results, "torch-fp32", "ov-modiff", b),
            False,
        ),
        ("MoDiff step overhead over OpenVINO plain INT8", "<= 15%", _ratio(results, "ov-modiff", "ov-plain", b), True),
        ("state as graph I/O vs state in variables", "-", _ratio(results, "ov-modiff-io", "ov-modiff", b), True),
    ]
    lines += [
        "",
        f"Speed goals of the `openvino` backend at batch {b}:",
        "",
        "| target | goal | measured |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {goal} | {(r - 1) * 100:+.0f}% |" if overhead else f"| {name} | {goal} | {r:.2f}x |"
        for name, goal, r, overhead in ov
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
