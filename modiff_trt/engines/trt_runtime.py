"""The `trt` backend: TensorRT engines driven with torch CUDA tensors, MoDiff state kept on the GPU.

Design (REFERENCE.md section 4, DESIGN.md "state never goes through the host"):

- I/O buffers are torch CUDA tensors; their `data_ptr()`s go to `set_tensor_address`. No
  pycuda: it ships no wheels and creates its own CUDA context that fights torch's. torch covers
  allocation, streams, events and CUDA graphs, so cuda-python is not needed here at all.
- All state tensors of a batch are views into one allocation (`StateBuffers`), two sets:
  the warm-up writes set 0, step k reads set (k-1) % 2 and writes set k % 2. Nothing is copied
  between steps, and the only per-call copies are `x`/`t` (and `context`) into the fixed input
  buffers and `eps` out of the fixed output buffer, all device-to-device.
- Each (graph, ping-pong arrangement, batch size) gets its own execution context whose
  addresses are set once. Costs one activation workspace per context, saves hundreds of
  `set_tensor_address` calls per step, and is what CUDA graphs need anyway: a captured graph
  bakes in every address, so each arrangement needs its own graph.
- Work runs on a dedicated non-default stream, ordered against the caller's stream with
  `wait_stream`, so the caller's torch code sees results without a device sync.
- `cuda_graph=True`: the first call of an arrangement runs eagerly (TensorRT does lazy setup
  on its first enqueue, which must not be captured), then it is captured with
  `torch.cuda.graph` around `execute_async_v3`; later calls copy inputs and replay.

Written against the TensorRT 10.x/11.x name-based API; NOT run on a GPU in this session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modiff_trt.errors import ArtifactError, ModiffError
from modiff_trt.export.manifest import Manifest, load_manifest
from modiff_trt.export.naming import CONTEXT, EPS, T, X
from modiff_trt.engines.sidecar import check_sidecar, read_sidecar, sidecar_path
from modiff_trt.engines.state_buffers import StateBuffers, layout_from_manifest
from modiff_trt.engines.trt_build import plan_path
from modiff_trt.engines.trt_env import cuda_device_info, import_tensorrt

log = logging.getLogger(__name__)

# Arrangements: which graph runs and which state set it reads/writes.
WARMUP, STEP_AB, STEP_BA, PLAIN = "warmup", "step_0to1", "step_1to0", "unet"
_READ_WRITE = {WARMUP: (None, 0), STEP_AB: (0, 1), STEP_BA: (1, 0), PLAIN: (None, None)}


def torch_dtype_for(trt: Any, dtype: Any) -> torch.dtype:
    """torch dtype of a TensorRT DataType (by name, so missing enum members on old versions are fine)."""
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    for name, torch_type in table.items():
        member = getattr(trt.DataType, name, None)
        if member is not None and dtype == member:
            return torch_type
    raise ArtifactError(f"engine tensor type {dtype} is not supported by the trt backend")


@dataclass
class _Bound:
    """Everything allocated for one batch size: fixed I/O buffers, state, contexts, graphs."""

    batch: int
    inputs: dict[str, torch.Tensor]  # x, t, context
    eps: torch.Tensor
    state: StateBuffers | None
    contexts: dict[str, Any] = field(default_factory=dict)  # arrangement -> IExecutionContext
    graphs: dict[str, torch.cuda.CUDAGraph] = field(default_factory=dict)


class TensorRTRunner:
    """UNetRunner over `warmup.plan` + `step.plan` (or `unet.plan`) of an export directory."""

    name = "trt"

    def __init__(
        self,
        export_dir: str | Path,
        manifest: Manifest | None = None,
        device: str | torch.device = "cuda",
        cuda_graph: bool = False,
    ) -> None:
        self.export_dir = Path(export_dir)
        self.manifest: Manifest = manifest or load_manifest(self.export_dir, verify_files=False)
        self.trt = import_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ModiffError(f"the trt backend runs on CUDA devices, got {self.device}")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        gpu_name, capability = cuda_device_info(index)
        self.cuda_graph = cuda_graph
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        self.engines: dict[str, Any] = {}
        for key, graph in self.manifest.graphs.items():
            plan = plan_path(self.export_dir, key)
            if not plan.is_file():
                raise ArtifactError(f"{plan} not found: build the engines with `modiff-trt build {self.export_dir}`")
            sidecar = read_sidecar(sidecar_path(plan))
            check_sidecar(sidecar, str(self.trt.__version__), gpu_name, capability, graph.sha256, source=str(plan))
            if sidecar.version_compatible:
                # Version-compatible plans embed a lean runtime that TensorRT must be allowed to load.
                self._runtime.engine_host_code_allowed = True
            engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT could not deserialize {plan} (see its log); rebuild with `modiff-trt build`")
            self.engines[key] = engine
        self.stream = torch.cuda.Stream(device=self.device)
        self._bound: dict[int, _Bound] = {}
        self._calls = 0

    # -- UNetRunner -------------------------------------------------------------------------

    def reset_state(self) -> None:
        """New batch: the next call runs the warm-up graph (the old state is simply overwritten)."""
        self._calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        bound = self._bind(int(x.shape[0]))
        arrangement = self._arrangement()
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for name, value in ((X, x), (T, t), (CONTEXT, context)):
                if name in bound.inputs:
                    if value is None:
                        raise ModiffError(f"the {self.manifest.model.get('name', 'model')} engine needs `{name}`")
                    value = value.to(self.device, non_blocking=True)
                    value.record_stream(self.stream)
                    bound.inputs[name].copy_(value.reshape(bound.inputs[name].shape), non_blocking=True)
            self._execute(bound, arrangement)
            # A copy, so the next call cannot overwrite what the sampler holds; float32 like `ort`.
            eps = bound.eps.to(dtype=torch.float32, copy=True)
        eps.record_stream(caller)
        caller.wait_stream(self.stream)
        self._calls += 1
        return eps

    # -- internals --------------------------------------------------------------------------

    def _arrangement(self) -> str:
        if not self.manifest.modulated:
            return PLAIN
        if self._calls == 0:
            return WARMUP
        return STEP_AB if self._calls % 2 == 1 else STEP_BA

    def _execute(self, bound: _Bound, arrangement: str) -> None:
        graph = bound.graphs.get(arrangement)
        if graph is not None:
            graph.replay()
            return
        context = bound.contexts[arrangement]
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise ModiffError(f"TensorRT execute_async_v3 failed for {arrangement} (see the TensorRT log)")
        if self.cuda_graph:
            # The eager run above produced this call's result and flushed TensorRT's deferred setup;
            # capturing launches nothing, so the state is untouched by it.
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph, stream=self.stream, capture_error_mode="thread_local"):
                context.execute_async_v3(self.stream.cuda_stream)
            bound.graphs[arrangement] = cuda_graph
            log.debug("captured a CUDA graph for %s at batch %d", arrangement, bound.batch)

    def _engine_key(self, arrangement: str) -> str:
        return {WARMUP: "warmup", STEP_AB: "step", STEP_BA: "step", PLAIN: "unet"}[arrangement]

    def _bind(self, batch: int) -> _Bound:
        """Allocate buffers and contexts for `batch` once; later calls at this batch reuse them."""
        if batch in self._bound:
            return self._bound[batch]
        trt = self.trt
        first = next(iter(self.engines.values()))
        lo, _, hi = (shape[0] for shape in first.get_tensor_profile_shape(X, 0))
        if not lo <= batch <= hi:
            raise ModiffError(
                f"batch {batch} is outside the engines' profile [{lo}, {hi}]: rebuild with "
                f"`modiff-trt build {self.export_dir} --min-batch/--max-batch`"
            )
        state = StateBuffers(layout_from_manifest(self.manifest, batch), self.device) if self.manifest.modulated else None
        inputs: dict[str, torch.Tensor] = {}
        for name in (X, T, CONTEXT):
            if _is_input(trt, first, name):
                shape = _batch_shape(first.get_tensor_shape(name), batch)
                inputs[name] = torch.zeros(shape, dtype=torch_dtype_for(trt, first.get_tensor_dtype(name)), device=self.device)
        eps_shape = _batch_shape(first.get_tensor_shape(EPS), batch)
        eps = torch.empty(eps_shape, dtype=torch_dtype_for(trt, first.get_tensor_dtype(EPS)), device=self.device)
        bound = _Bound(batch, inputs, eps, state)
        arrangements = (WARMUP, STEP_AB, STEP_BA) if self.manifest.modulated else (PLAIN,)
        for arrangement in arrangements:
            bound.contexts[arrangement] = self._make_context(arrangement, bound)
        self._bound[batch] = bound
        return bound

    def _make_context(self, arrangement: str, bound: _Bound) -> Any:
        trt = self.trt
        engine = self.engines[self._engine_key(arrangement)]
        context = engine.create_execution_context()
        read, write = _READ_WRITE[arrangement]
        state_in = bound.state.inputs(read) if bound.state is not None and read is not None else {}
        state_out = bound.state.outputs(write) if bound.state is not None and write is not None else {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            tensor = (bound.inputs | state_in).get(name) if is_input else ({EPS: bound.eps} | state_out).get(name)
            if tensor is None:
                raise ArtifactError(
                    f"{arrangement} engine tensor {name!r} is not described by {self.export_dir}/manifest.json: "
                    "the plans and the manifest come from different exports; rebuild with `modiff-trt build`"
                )
            expected = torch_dtype_for(trt, engine.get_tensor_dtype(name))
            if tensor.dtype != expected:
                raise ArtifactError(
                    f"{name}: the engine wants {expected}, the manifest says {tensor.dtype} (state_dtype): "
                    "re-export and rebuild"
                )
            if is_input and not context.set_input_shape(name, tuple(tensor.shape)):
                raise ModiffError(f"TensorRT rejected shape {tuple(tensor.shape)} for {name}")
            if tensor.data_ptr() % 256:
                raise ModiffError(f"{name} buffer is not 256-byte aligned")  # guarded by StateBuffers
            context.set_tensor_address(name, tensor.data_ptr())
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                got = tuple(context.get_tensor_shape(name))
                want = tuple((bound.inputs | state_in | {EPS: bound.eps} | state_out)[name].shape)
                if got != want:
                    raise ArtifactError(f"{name}: the engine produces {got} but the manifest's layer table says {want}")
        return context


def _is_input(trt: Any, engine: Any, name: str) -> bool:
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    return name in names and engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT


def _batch_shape(dims: Any, batch: int) -> tuple[int, ...]:
    dims = tuple(int(d) for d in dims)
    return (batch, *dims[1:])
