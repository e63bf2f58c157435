"""`--device`: where torch code (calibration, the torch reference backend) runs.

Why one function: `calibrate`, `sample` and `compare` take the same option with the same
default, `auto` (a CUDA device when torch sees one, else the CPU), and a user who asks for CUDA
on a machine without it gets one line naming `--device` before a model loads, not a CUDA
error from deep inside the first forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modiff_trt.errors import BackendUnavailableError, OptionError

AUTO = "auto"
HELP = "auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N"
#: The backends `--device` places: the torch reference, and TensorRT (its plans' CUDA device).
DEVICE_BACKENDS = ("torch", "trt")

if TYPE_CHECKING:
    import torch


def torch_device(option: str, local_rank: int = 0) -> torch.device:
    """The device `--device option` names, checked before any work.

    `auto` is cuda:`local_rank` (the process's GPU under torchrun) when CUDA is available, else
    the CPU. An unknown name, a non-CPU/CUDA device, CUDA without CUDA and a CUDA index past the
    last GPU are refused with the fix. torch is imported here, not with the module, so that the
    CLI's option defaults (`AUTO`) cost no torch import.
    """
    import torch

    if option == AUTO:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(option)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {option!r} is not a device: use {HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device {option}: torch code here runs on cpu or cuda ({HELP})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"--device {option}: CUDA is not available to torch (no GPU, no driver, or a CPU-only torch): "
                "use --device cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(
                f"--device {option}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def runner_device(backend: str, device: str, local_rank: int = 0) -> str:
    """`--device` for `backend`: the torch reference's device, TensorRT's CUDA device (auto: cuda).

    ONNX Runtime picks its device with --ort-provider and OpenVINO runs on the CPU, so a
    `--device` other than auto is refused for them rather than silently ignored.
    """
    if backend == "torch":
        return str(torch_device(device, local_rank))
    if backend == "trt":
        return "cuda" if device == AUTO else device
    if device != AUTO and backend not in DEVICE_BACKENDS:
        fix = "choose its device with --ort-provider" if backend == "ort" else "it runs on the CPU"
        raise OptionError(f"--device applies to --backend torch and trt, not {backend}: {fix}")
    return device
