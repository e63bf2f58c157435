"""The closed sets of words options take, as `str` enums.

Typer lists an enum's values in --help and refuses anything else before a command runs, and a
member still equals (and formats as) its plain string, so the library compares and records them
as strings. (`enum.StrEnum` would do the same from Python 3.11 on; the package supports 3.10.)
"""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A `str` enum whose members print and format as their value, on every supported Python."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Backend(StrEnum):
    """Where the UNet runs: the PyTorch reference, ONNX Runtime, OpenVINO or TensorRT engines."""

    torch = "torch"
    ort = "ort"
    openvino = "openvino"
    trt = "trt"


class CpuBackend(StrEnum):
    """The export-directory backends that run on any CPU (the demo's choice)."""

    openvino = "openvino"
    ort = "ort"


class SkipType(StrEnum):
    """ddim's timestep selection: squares (`quad`) or a constant stride (`uniform`)."""

    quad = "quad"
    uniform = "uniform"


class FirstStep(StrEnum):
    """The warm-up step: float activations or quantized ones."""

    fp = "fp"
    quantized = "quantized"


class StateLayout(StrEnum):
    """How a_hat is carried between steps: as is, or in units of its residual scale."""

    plain = "plain"
    scaled = "scaled"


class StateDtype(StrEnum):
    """Precision of the MoDiff state carried between steps."""

    float32 = "float32"
    float16 = "float16"


class FloatFormat(StrEnum):
    """Float parts of an exported graph."""

    fp32 = "fp32"
    fp16 = "fp16"


class Target(StrEnum):
    """Which runtime's quantization rules an export follows."""

    trt = "trt"
    ort_cpu = "ort-cpu"


class OrtProvider(StrEnum):
    """ONNX Runtime execution provider."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"


class Method(StrEnum):
    """Activation scale search of `calibrate`."""

    minmax = "minmax"
    mse = "mse"
    percentile = "percentile"


class WeightMethod(StrEnum):
    """Integer weights of `calibrate`: nearest rounding on absmax or MSE-searched scales, or AdaRound
    rounding learned by block reconstruction (Q-Diffusion/BRECQ) on the MSE grid."""

    minmax = "minmax"
    mse = "mse"
    adaround = "adaround"


class LatentSampler(StrEnum):
    """Latent-diffusion sampler."""

    ddim = "ddim"
    plms = "plms"


class Scheduler(StrEnum):
    """A diffusers scheduler that drives the UNet calls (needs the diffusers extra)."""

    ddim = "ddim"
    pndm = "pndm"
    dpm_solver_pp = "dpm-solver++"
    euler = "euler"


class Engine(StrEnum):
    """Which TensorRT plan `profile` times."""

    step = "step"
    warmup = "warmup"


class ActScales(StrEnum):
    """Activation scales: measured per call, or read from a calibration file."""

    dynamic = "dynamic"
    static = "static"


class ActFormat(StrEnum):
    """Activation grid: b-bit integers, FP8 E4M3 or NVFP4 (E2M1 in 16-channel blocks)."""

    int = "int"
    fp8 = "fp8"
    nvfp4 = "nvfp4"
