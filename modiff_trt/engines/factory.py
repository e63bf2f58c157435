"""Open the backend a user names for an export directory: torch, ort, openvino or trt."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from modiff_trt.devices import AUTO, runner_device
from modiff_trt.engines.base import UNetRunner
from modiff_trt.errors import ConfigError
from modiff_trt.export.manifest import Manifest, load_manifest

BACKENDS = ("torch", "ort", "openvino", "trt")

log = logging.getLogger(__name__)


def fastest_cpu_backend() -> str:
    """`openvino` when installed and exact on this CPU, else `ort`.

    OpenVINO runs the INT8 graphs on integer kernels, where ONNX Runtime's CPU provider
    dequantizes to float (BENCHMARKS.md, `speed`). It has no FP8/NVFP4 kernels: callers send
    such exports to ONNX Runtime (`openvino_backend.unsupported`), and on x86 CPUs without VNNI
    its int8 kernels are not exact (`openvino_backend.exact_int8_kernels`), so ONNX Runtime runs
    there. ONNX Runtime stays the reference runtime of the tests.
    """
    if importlib.util.find_spec("openvino") is None:
        return "ort"
    from modiff_trt.engines.openvino_backend import exact_int8_kernels

    if not exact_int8_kernels():
        log.info("this CPU has no VNNI, where OpenVINO's int8 kernels are not exact: sampling with ort")
        return "ort"
    return "openvino"


def cpu_backend_for(export_dir: str | Path, preferred: str) -> str:
    """`preferred`, or `ort` where it is `openvino` and OpenVINO cannot run `export_dir` (FP8/NVFP4 layers)."""
    if preferred != "openvino":
        return preferred
    from modiff_trt.engines.openvino_backend import unsupported

    reason = unsupported(load_manifest(export_dir))
    if reason is None:
        return preferred
    log.info("%s %s; running it with ort", export_dir, reason.split(":")[0])
    return "ort"


def open_runner(
    export_dir: str | Path,
    backend: str,
    batch_size: int | None = None,
    trust: bool = False,
    cuda_graph: bool = False,
    ort_provider: str = "auto",
    device: str = AUTO,
) -> tuple[UNetRunner, Manifest]:
    """A runner over `export_dir` and its manifest; heavy runtimes are imported only when named.

    `device` (`--device`, see `devices.runner_device`): where the torch reference runs, or the CUDA
    device of TensorRT's plans; checked before the export loads.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    device = runner_device(backend, device)
    manifest = load_manifest(export_dir)
    if backend == "torch":
        from modiff_trt.engines.torch_backend import reference_from_manifest

        return reference_from_manifest(manifest, export_dir, trust=trust).to(device), manifest
    if backend == "ort":
        from modiff_trt.engines.ort_backend import OrtRunner

        return OrtRunner(export_dir, manifest=manifest, provider=ort_provider), manifest
    if backend == "openvino":
        from modiff_trt.engines.openvino_backend import OpenVinoRunner

        return OpenVinoRunner(export_dir, manifest=manifest), manifest
    from modiff_trt.engines.trt_runtime import TensorRTRunner

    return TensorRTRunner(export_dir, manifest=manifest, device=device, cuda_graph=cuda_graph), manifest
