"""The `ort` backend: the exported graphs on ONNX Runtime, state in runtime-bound buffers.

State never round-trips through numpy: both state sets live in one torch allocation
(`StateBuffers`), and IO binding hands ONNX Runtime raw pointers into it. Which graph runs and
which set it reads and writes comes from `StatefulRunner` (engines/runner.py), as for every
backend, so no state is copied between steps. The CUDA execution provider is used when
onnxruntime-gpu sees a GPU, with the buffers on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from modiff_trt.engines.runner import Arrangement, StatefulRunner
from modiff_trt.engines.state_buffers import StateBuffers, layout_from_manifest, torch_dtype
from modiff_trt.errors import ArtifactError, BackendUnavailableError, ConfigError, first_line
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
    index = torch.cuda.current_device()  # cuda:LOCAL_RANK in a distributed run (torch.cuda.set_device)
    providers: list = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if provider == "tensorrt":
        options = {
            "device_id": index,
            "trt_int8_enable": True,
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(export_dir / "ort-trt-cache"),
        }
        providers.insert(0, ("TensorrtExecutionProvider", options))
    return providers, torch.device("cuda", index)


def session_options(threads: int | None = None):
    """ONNX Runtime session options that keep quantized graphs exact.

    ORT fuses a MatMul whose weight comes through DequantizeLinear into MatMulNBits, and by
    default (accuracy level 4) that kernel re-quantizes the float activation to int8 on the fly.
    FP8 and NVFP4 layers on 3-D inputs (SD's attention and feed-forward) have exactly that shape,
    and MoDiff's o_hat would accumulate the extra error; accuracy level 1 computes in fp32.

    On x86 ORT also rewrites a signed int8 activation Q/DQ pair whose codes feed only the fused
    op (QGemm, QLinearConv) to uint8, for its u8 x s8 kernels; without VNNI those add pairs of
    products in saturating 16-bit lanes (AVX2's `vpmaddubsw`), so large codes against large
    weights clip. Measured on an AVX2-only EPYC: a MoDiff layer whose residual codes fed only
    its Gemm (a layer sharing another's a_hat) was off by 16% of its output. Allowing int8 QDQ
    keeps the codes signed, on kernels that do not saturate.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    return options


class OrtRunner(StatefulRunner):
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

        export_dir = Path(export_dir)
        manifest = manifest or load_manifest(export_dir)
        nvfp4 = sum(layer.act_format == "nvfp4" for layer in manifest.layers)
        if nvfp4 and manifest.export.target == "trt":
            raise ArtifactError(
                f"{export_dir} quantizes {nvfp4} layer(s) to NVFP4 with TensorRT's own op, which ONNX Runtime "
                "cannot run: export with --target ort-cpu for ONNX Runtime, or build it with `modiff-trt build`"
            )
        providers, device = _providers(provider, export_dir)
        super().__init__(export_dir, manifest, device)
        options = session_options(threads)
        self.sessions = {}
        for key, graph in self.manifest.graphs.items():
            try:
                self.sessions[key] = ort.InferenceSession(str(export_dir / graph.file), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own unexported exception types
                raise ArtifactError(
                    f"ONNX Runtime cannot load {self.export_dir / graph.file} ({first_line(exc)}): "
                    "re-run `modiff-trt export`"
                ) from exc
        self.float_dtype = torch_dtype(self.manifest.export.float_dtype)
        self._buffers: StateBuffers | None = None

    def _state(self, batch: int) -> StateBuffers:
        if self._buffers is None or self._buffers.layout.batch_size != batch:
            self._buffers = StateBuffers(layout_from_manifest(self.manifest, batch), self.device)
        return self._buffers

    def _state_set(self, index: int) -> Mapping[str, torch.Tensor]:
        return self._state(self.batch).inputs(index)

    @staticmethod
    def _bind(binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        kind = "cuda" if tensor.is_cuda else "cpu"
        index = tensor.device.index or 0
        dtype = np.dtype(str(tensor.dtype).replace("torch.", ""))
        bind = binding.bind_output if output else binding.bind_input
        bind(name, kind, index, dtype, list(tensor.shape), tensor.data_ptr())

    def _run_impl(
        self, arrangement: Arrangement, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        batch = x.shape[0]
        binding = self.sessions[arrangement.graph].io_binding()
        # IO binding keeps raw pointers only: `feeds` keeps the converted inputs alive until the run.
        feeds = {
            naming.X: x.to(self.device, self.float_dtype).contiguous(),
            naming.T: t.to(self.device, torch.float32).contiguous(),
        }
        if context is not None:
            feeds[naming.CONTEXT] = context.to(self.device, self.float_dtype).contiguous()
        for name, tensor in feeds.items():
            self._bind(binding, name, tensor)
        eps = torch.empty((batch, *self.inputs.sample_shape), dtype=self.float_dtype, device=self.device)
        self._bind(binding, naming.EPS, eps, output=True)
        if arrangement.read is not None:
            for name, tensor in self._state(batch).inputs(arrangement.read).items():
                self._bind(binding, name, tensor)
            if self.step_scales is not None:
                self._bind(binding, self.step_scales.name, self.step_scales.buffer)
        if arrangement.write is not None:
            for name, tensor in self._state(batch).outputs(arrangement.write).items():
                self._bind(binding, name, tensor, output=True)
        self.sessions[arrangement.graph].run_with_iobinding(binding)
        return eps
