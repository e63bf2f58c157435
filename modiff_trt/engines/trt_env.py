"""Finding TensorRT and the GPU, lazily, with errors that say how to get them.

`tensorrt` is imported only inside these functions (as Polygraphy does), so `import modiff_trt`
and the CPU-only paths never need it. Shared by the builder, the runtime and the profiler.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from modiff_trt.errors import BackendUnavailableError, ModiffError

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


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "CUDA is not available to torch (no NVIDIA GPU, no driver, or a CPU-only torch build): "
            "TensorRT engines can only be built and run on a CUDA machine; use `--backend ort` here"
        )


def cuda_index(device: str | int | None = None) -> int:
    """The GPU index of `device` ('cuda' or None: the current one, 'cuda:1', 1), checked to exist.

    TensorRT builds and runs on whatever device is current, so callers make this index current
    (`torch.cuda.device`) around every TensorRT call instead of trusting the caller's state.
    """
    import torch

    _require_cuda()
    if isinstance(device, int):
        index: int | None = device
    else:
        spec = torch.device(device if device is not None else "cuda")
        if spec.type != "cuda":
            raise ModiffError(f"TensorRT runs on CUDA devices, got {spec}: use --device cuda or cuda:N")
        index = spec.index
    index = torch.cuda.current_device() if index is None else index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ModiffError(
            f"CUDA device {index} does not exist (this machine has {count}): use --device cuda:0..{count - 1}"
        )
    return index


def cuda_device_info(index: int) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of GPU `index`; no CUDA -> BackendUnavailableError."""
    import torch

    _require_cuda()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"
