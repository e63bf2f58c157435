"""The `ort` backend: the exported graphs on ONNX Runtime, state in runtime-bound buffers.

State never round-trips through numpy: both state sets live in one torch allocation
(`StateBuffers`), and IO binding hands ONNX Runtime raw pointers into it. Step k reads set
(k-1) % 2 and writes set k % 2 (ping-pong), so no state is copied between steps. The CUDA
execution provider is used when onnxruntime-gpu sees a GPU, with the buffers on the device.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from modiff_trt.engines.state_buffers import StateBuffers, layout_from_manifest, torch_dtype
from modiff_trt.errors import ArtifactError, BackendUnavailableError, ConfigError, ModiffError
from modiff_trt.export import naming
from modiff_trt.export.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)


PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")


def _providers(provider: str, export_dir: Path) -> tuple[list, torch.device]:
    """ONNX Runtime providers for `provider` and the device the state buffers live on.

    `tensorrt` hands the graphs to ONNX Runtime's TensorRT execution provider (int8 on, so the
    explicit Q/DQ nodes set the precision; engines cached in DIR/ort-trt-cache), falling back to
    CUDA for unsupported nodes; `auto` takes CUDA when onnxruntime-gpu sees a GPU, else the CPU.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ConfigError(f"unknown ONNX Runtime provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    gpu = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    if provider == "cpu" or (provider == "auto" and not gpu):
        return ["CPUExecutionProvider"], torch.device("cpu")
    needed = "TensorrtExecutionProvider" if provider == "tensorrt" else "CUDAExecutionProvider"
    if not gpu or needed not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime's {needed} is not available (have: {', '.join(available)}): install onnxruntime-gpu "
            "(and TensorRT for the tensorrt provider) on a machine with an NVIDIA GPU and a CUDA build of torch, "
            "or use --ort-provider cpu"
        )
    providers: list = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "tensorrt":
        options = {"trt_int8_enable": True, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                   "trt_engine_cache_path": str(export_dir / "ort-trt-cache")}
        providers.insert(0, ("TensorrtExecutionProvider", options))
    return providers, torch.device("cuda")


class OrtRunner:
    """A stateful UNet over an export directory, run by ONNX Runtime."""

    name = "ort"

    def __init__(
        self,
        export_dir: str | Path,
        manifest: Manifest | None = None,
        provider: str = "auto",
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.manifest = manifest or load_manifest(self.export_dir)
        providers, self.device = _providers(provider, self.export_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.sessions = {}
        for key, graph in self.manifest.graphs.items():
            try:
                self.sessions[key] = ort.InferenceSession(str(self.export_dir / graph.file), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own unexported exception types
                raise ArtifactError(f"ONNX Runtime cannot load {self.export_dir / graph.file}: {exc}") from exc
        self.float_dtype = torch_dtype(self.manifest.export.get("float", "float32"))
        self.sample_shape = tuple(self.manifest.model["sample_shape"])
        self._buffers: StateBuffers | None = None
        self._calls = 0

    def reset_state(self) -> None:
        self._calls = 0

    def _state(self, batch: int) -> StateBuffers:
        if self._buffers is None or self._buffers.layout.batch_size != batch:
            self._buffers = StateBuffers(layout_from_manifest(self.manifest, batch), self.device)
        return self._buffers

    def _check(self, x: torch.Tensor, t: torch.Tensor) -> None:
        fixed = self.manifest.batch_size
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ModiffError(
                f"input x has shape {tuple(x.shape)}, but {self.export_dir} was exported for "
                f"[batch, {', '.join(map(str, self.sample_shape))}]"
            )
        if fixed is not None and x.shape[0] > fixed:
            raise ModiffError(
                f"batch size {x.shape[0]} exceeds {self.export_dir}, exported for batch {fixed}: "
                f"use --batch-size {fixed} or re-export with --dynamic-batch"
            )
        if t.shape != (x.shape[0],):
            raise ModiffError(f"t must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ModiffError("input x contains NaN or Inf: the sampler diverged or the noise is corrupt")

    @staticmethod
    def _bind(binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        kind = "cuda" if tensor.is_cuda else "cpu"
        index = tensor.device.index or 0
        dtype = np.dtype(str(tensor.dtype).replace("torch.", ""))
        bind = binding.bind_output if output else binding.bind_input
        bind(name, kind, index, dtype, list(tensor.shape), tensor.data_ptr())

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, t)
        fixed, batch = self.manifest.batch_size, x.shape[0]
        if fixed is not None and batch < fixed:
            # A short last batch on a fixed-batch export: pad with copies of the last sample. Every
            # op is per sample (static scales, GroupNorm, attention), so padding changes nothing.
            x, t = _pad(x, fixed), _pad(t, fixed)
            context = None if context is None else _pad(context, fixed)
            return self(x, t, context)[:batch]
        key = "unet" if "unet" in self.sessions else ("warmup" if self._calls == 0 else "step")
        session = self.sessions[key]
        binding = session.io_binding()
        x_in = x.to(self.device, self.float_dtype).contiguous()
        t_in = t.to(self.device, torch.float32).contiguous()
        self._bind(binding, naming.X, x_in)
        self._bind(binding, naming.T, t_in)
        if context is not None:
            self._bind(binding, naming.CONTEXT, context.to(self.device, self.float_dtype).contiguous())
        eps = torch.empty((batch, *self.sample_shape), dtype=self.float_dtype, device=self.device)
        self._bind(binding, naming.EPS, eps, output=True)
        if key != "unet":
            state = self._state(batch)
            write = self._calls % 2
            if key == "step":
                for name, tensor in state.inputs(1 - write).items():
                    self._bind(binding, name, tensor)
            for name, tensor in state.outputs(write).items():
                self._bind(binding, name, tensor, output=True)
        session.run_with_iobinding(binding)
        self._calls += 1
        return eps.float()


def _pad(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` grown to `size` rows along dim 0 by repeating its last row."""
    return torch.cat([tensor, tensor[-1:].expand(size - tensor.shape[0], *tensor.shape[1:])])
