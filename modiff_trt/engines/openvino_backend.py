"""The `openvino` backend: the export directory's graphs on OpenVINO's CPU plugin, state inside.

OpenVINO's low-precision transformations turn the TensorRT-style `Q -> DQ -> Conv` of the
`trt` export target into u8 x i8 convolutions, so the same graphs TensorRT gets run as integer
kernels on a CPU. The step graph's 2 x L state inputs/outputs become *variables* of the compiled
model (ReadValue/Assign pairs, OpenVINO's stateful-model mechanism): the state stays inside the
plugin between steps and never crosses the API, which removes the layout conversions the
plugin inserts around plain NCHW graph I/O (docs/openvino.md has the measurements).

`OpenVinoRunner` is a `StatefulRunner` (engines/runner.py): the base validates and pads the
inputs, decides warm-up vs step and fills the step-group `step_scale_ratio` input. Call 0 after
`reset_state()` runs the stateless warm-up graph and copies its `a_hat_out.L`/`o_hat_out.L`
outputs into the step model's variables (`query_state`); every later call runs the stateful
step, which reads and rewrites the variables itself. The base's two ping-pong state sets have
no counterpart here: the plugin double-buffers its variables within an inference.

OpenVINO 2026.4's CPU plugin has no FP8 kernels (compiling an FP8 Q/DQ graph fails with
"unsupported src_prc: f8e4m3") and cannot read TensorRT's NVFP4 op, so exports with FP8 or
NVFP4 layers are refused with the backend that runs them (`unsupported`).

Why not `openvino._offline_transformations.apply_make_stateful_transformation`: it makes each
Assign control-depend on its ReadValue, and OpenVINO's `AssignAndReadValueTransformation`
(low precision) then matches the Assign fed by a dequantize Multiply and reads the ReadValue's
initializer input, which that ReadValue does not have: compilation fails with "index '0' out of
range" (OpenVINO 2026.4). `make_stateful` below builds the same pairs without the control edge
(the data edge a_hat_out = a_hat_in + rq already orders them), so that pass never fires and the
variables keep their float32 meaning: what `query_state` returns is a_hat and o_hat themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from modiff_trt.engines.runner import Arrangement, StatefulRunner
from modiff_trt.errors import ArtifactError, BackendUnavailableError, first_line
from modiff_trt.export import naming
from modiff_trt.export.manifest import Manifest, load_manifest

if TYPE_CHECKING:
    import openvino as ov

log = logging.getLogger(__name__)

# Exactness needs float32 arithmetic outside the integer kernels: OpenVINO defaults to bf16 on
# CPUs with AMX, and quantizes the activations of weight-compressed FullyConnected layers on
# the fly (group size 32) unless told otherwise.
COMPILE_CONFIG = {
    "INFERENCE_PRECISION_HINT": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    "PERFORMANCE_HINT": "LATENCY",
}


#: x86 instruction sets with an int8 dot product that sums in 32 bits (what exactness needs).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
CPUINFO = Path("/proc/cpuinfo")


def exact_int8_kernels(cpuinfo: Path | None = None) -> bool:
    """Whether OpenVINO's int8 kernels compute the reference's integer sums on this CPU.

    Measured on an AVX2-only x86 CPU (AMD EPYC, no VNNI): per-layer `o_hat` gains off by up to
    72% of their range, in 320 of 918 checked (layer, step) pairs of a W8A8 export, where the
    same check passes on CPUs with VNNI. That fits the 16-bit saturating u8 x s8 multiply-add
    (`vpmaddubsw`) such CPUs fall back to. An x86 CPU whose flags show none of `VNNI_FLAGS` is
    taken as inexact; a CPU this cannot tell (no /proc/cpuinfo, not x86) as exact.
    """
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None or "sse2" not in flags:  # not x86: other kernels, not measured here
        return True
    return bool(VNNI_FLAGS & set(flags))


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailableError(
            "OpenVINO is not installed: `pip install openvino` (a wheel from PyPI), or use --backend ort"
        ) from exc
    return openvino


def unsupported(manifest: Manifest) -> str | None:
    """Why OpenVINO's CPU plugin cannot run this export (None: it can): FP8 and NVFP4 layers."""
    formats = sorted({layer.act_format for layer in manifest.layers if layer.act_format not in (None, "int")})
    if not formats:
        return None
    return (
        f"quantizes layers to {'/'.join(f.upper() for f in formats)}, which OpenVINO's CPU plugin cannot run "
        "(no FP8 kernels, no NVFP4 op): use --backend ort (NVFP4: an export with --target ort-cpu)"
    )


def read_graph(path: str | Path, batch: int) -> ov.Model:
    """The ONNX graph at `path` with every batched input's first dimension fixed to `batch`
    (`step_scale_ratio` is not per sample and keeps its shape).

    Static shapes let the CPU plugin pick its integer kernels and memory plan once.
    """
    ov = _openvino()
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise ArtifactError(f"OpenVINO cannot read {path} ({first_line(exc)}): re-run `modiff-trt export`") from exc
    model.reshape(
        {
            port.get_any_name(): [batch, *list(port.get_partial_shape())[1:]]
            for port in model.inputs
            if not port.get_names() & naming.UNBATCHED
        }
    )
    return model


def _state_name(names: set[str], kind: str) -> str | None:
    """The `a_hat_<kind>.L`/`o_hat_<kind>.L` name among a port's names (OpenVINO keeps every alias the
    ONNX graph gave the tensor, e.g. an Identity's input and output)."""
    found = [n for n in names if n.startswith(tuple(f"{k}_{kind}." for k in naming.STATE_KINDS))]
    return found[0] if found else None


def make_stateful(model: ov.Model) -> list[str]:
    """Turn every state input `a_hat_in.L`/`o_hat_in.L` of a step graph into a variable of that
    name, written by an Assign of the paired output `*_out.L`; returns the variable names.

    The pairs get no Assign -> ReadValue control edge (see the module docstring).
    """
    ov = _openvino()
    from openvino.op import assign, read_value
    from openvino.op.util import Variable, VariableInfo

    results = {_state_name(r.output(0).get_names(), "out"): r for r in model.get_results()}
    names, sinks = [], []
    for param in model.get_parameters():
        name = _state_name(param.output(0).get_names(), "in")
        if name is None:
            continue
        result = results.get(naming.output_for_input(name))
        if result is None:
            raise ArtifactError(f"step graph input {name} has no output {naming.output_for_input(name)}: re-export")
        info = VariableInfo()
        info.variable_id, info.data_shape, info.data_type = name, param.get_partial_shape(), param.get_element_type()
        variable = Variable(info)
        reader = read_value(variable)
        for target in list(param.output(0).get_target_inputs()):
            target.replace_source_output(reader.output(0))
        source = result.input_value(0)
        node = source.get_node() if source.get_node().get_output_size() == 1 else ov.opset16.identity(source)
        sinks.append(assign(node, variable))
        model.add_variables([variable])
        model.remove_result(result)
        model.remove_parameter(param)
        names.append(name)
    model.add_sinks(sinks)
    model.validate_nodes_and_infer_types()
    return names


def compile_graph(model: ov.Model, threads: int | None = None, config: Mapping | None = None) -> ov.CompiledModel:
    """Compile for the CPU plugin with the exactness settings of `COMPILE_CONFIG`."""
    ov = _openvino()
    options = {**COMPILE_CONFIG, **(config or {})}
    if threads:
        options["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(model, "CPU", options)


def seed_state(request: ov.InferRequest, outputs: Mapping[str, object]) -> None:
    """Copy warm-up outputs (`a_hat_out.L` -> ov.Tensor or array) into the step's variables `a_hat_in.L`."""
    ov = _openvino()
    for state in request.query_state():
        value = outputs[naming.output_for_input(state.name)]
        state.state = value if isinstance(value, ov.Tensor) else ov.Tensor(np.ascontiguousarray(value))


def read_state(request: ov.InferRequest) -> dict[str, np.ndarray]:
    """The step's variables (what the next step reads), copied out, keyed `a_hat_in.L`."""
    return {state.name: state.state.data.copy() for state in request.query_state()}


class OpenVinoRunner(StatefulRunner):
    """A stateful UNet over an export directory, run by OpenVINO on the CPU.

    Graphs are compiled per (padded) batch size on first use (static shapes); a different batch
    size compiles again.
    """

    name = "openvino"

    def __init__(self, export_dir: str | Path, manifest: Manifest | None = None, threads: int | None = None) -> None:
        _openvino()
        export_dir = Path(export_dir)
        manifest = manifest or load_manifest(export_dir)
        reason = unsupported(manifest)
        if reason is not None:
            raise ArtifactError(f"{export_dir} {reason}")
        super().__init__(export_dir, manifest, "cpu")
        if manifest.quant.weight_bits is not None and not exact_int8_kernels():
            log.warning(
                "this CPU has no VNNI: OpenVINO's int8 kernels do not reproduce the quantized reference here "
                "(per-layer errors of tens of percent measured); use --backend ort for exact results"
            )
        self.threads = threads
        self._requests: dict[int, dict[str, ov.InferRequest]] = {}

    def _compiled(self, batch: int) -> dict[str, ov.InferRequest]:
        if batch not in self._requests:
            requests = {}
            for key, graph in self.manifest.graphs.items():
                model = read_graph(self.export_dir / graph.file, batch)
                if key == "step":
                    make_stateful(model)
                try:
                    requests[key] = compile_graph(model, self.threads).create_infer_request()
                except RuntimeError as exc:
                    raise ArtifactError(f"OpenVINO cannot compile {self.export_dir / graph.file}: {exc}") from exc
            log.info("compiled %s for batch %d with OpenVINO", ", ".join(requests), batch)
            self._requests[batch] = requests
        return self._requests[batch]

    def _state_set(self, index: int) -> Mapping[str, torch.Tensor]:
        """The variables the next step reads (copies; one set: `index` only says a step follows)."""
        return {k: torch.from_numpy(v) for k, v in read_state(self._compiled(self.batch)["step"]).items()}

    def _run_impl(
        self, arrangement: Arrangement, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        requests = self._compiled(x.shape[0])
        request = requests[arrangement.graph]
        feeds = {naming.X: x, naming.T: t}
        if context is not None:
            feeds[naming.CONTEXT] = context
        if arrangement.graph == "step" and self.step_scales is not None:
            feeds[self.step_scales.name] = self.step_scales.buffer
        arrays = {}
        for port in request.model_inputs:
            name = next(n for n in port.get_names() if n in feeds)
            dtype = port.get_element_type().to_dtype()
            arrays[name] = np.ascontiguousarray(feeds[name].detach().cpu().numpy().astype(dtype, copy=False))
        request.infer(arrays, share_inputs=True)
        if arrangement.graph == "warmup":
            seed_state(
                requests["step"],
                {
                    _state_name(port.get_names(), "out"): request.get_tensor(port)
                    for port in request.model_outputs
                    if naming.EPS not in port.get_names()
                },
            )
        return torch.from_numpy(request.get_tensor(naming.EPS).data.copy())
