"""Finding TensorRT and the GPU, lazily, with errors that say how to get them.

`tensorrt` is imported only inside these functions (as Polygraphy does), so `import modiff_trt`
and the CPU-only paths never need it. Shared by the builder, the runtime and the profiler.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from modiff_trt.errors import BackendUnavailableError

INSTALL_HINT = (
    "install it on a machine with an NVIDIA GPU and driver: `pip install 'modiff-trt[trt]'` "
    "(or `pip install tensorrt-cu12` / `tensorrt-cu13` to match your CUDA), then check with "
    "`python -c 'import tensorrt; print(tensorrt.__version__)'`. On a CPU-only machine use the "
    "ONNX Runtime backend (`--backend ort`) instead"
)


def import_tensorrt() -> ModuleType:
    """Import `tensorrt` or raise BackendUnavailableError with the install command."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:  # also catches a broken install (missing libnvinfer)
        raise BackendUnavailableError(f"TensorRT is not importable ({exc}): {INSTALL_HINT}") from exc


def trt_major(trt: ModuleType) -> int:
    """Major version of an imported tensorrt module (10, 11, ...)."""
    return int(str(trt.__version__).split(".")[0])


def cuda_device_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") via torch; no CUDA -> BackendUnavailableError."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "CUDA is not available to torch (no NVIDIA GPU, no driver, or a CPU-only torch build): "
            "TensorRT engines can only be built and run on a CUDA machine; use `--backend ort` here"
        )
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"
