"""The `trt` backend: TensorRT engines driven with torch CUDA tensors, MoDiff state kept on the GPU.

Design:

- I/O buffers are torch CUDA tensors; their `data_ptr()`s go to `set_tensor_address`. No
  pycuda: it ships no wheels and creates its own CUDA context that fights torch's. torch covers
  allocation, streams, events and CUDA graphs, so cuda-python is not needed here at all.
- Warm-up vs step and the ping-pong state sets come from `StatefulRunner` (engines/runner.py);
  all state tensors of a batch are views into one allocation (`StateBuffers`). Nothing is
  copied between steps; the only per-call copies are `x`/`t` (and `context`) into the fixed
  input buffers and `eps` out of the fixed output buffer, all device-to-device.
- Each (arrangement, batch size) gets its own execution context whose addresses are set once:
  one activation workspace per context, but no per-step `set_tensor_address` calls, and it is
  what CUDA graphs need anyway (a captured graph bakes in every address). When a warm-up starts
  a trajectory at a new batch size, the contexts and buffers of other batch sizes are released.
- Every TensorRT call (deserialization, contexts, binding, execution) runs with the runner's GPU
  current (`torch.cuda.device`), so `device="cuda:1"` works whatever device is current.
- Work runs on the launcher's stream (a dedicated non-default CUDA stream), ordered against
  the caller's stream, so the caller's torch code sees results without a device sync.
- `cuda_graph=True`: the first call of an arrangement runs eagerly (TensorRT does lazy setup
  on its first enqueue, which must not be captured), then it is captured. A capture whose
  `execute_async_v3` fails is ended and discarded, and that arrangement stays eager with a
  warning (what trtexec does): replaying a partial graph would leave eps and the state stale.

Written against the TensorRT 10.x/11.x name-based API; NOT run on a GPU. CPU tests drive it
with a double of the TensorRT runtime (tests/helpers/trt_double.py) whose "engines" run the
same ONNX graphs with ONNX Runtime: that checks this module's logic, not TensorRT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from modiff_trt.engines.runner import Arrangement, StatefulRunner
from modiff_trt.engines.sidecar import check_sidecar, read_sidecar, sidecar_path
from modiff_trt.engines.state_buffers import ALIGNMENT, StateBuffers, aligned_empty, layout_from_manifest
from modiff_trt.engines.trt_build import plan_path
from modiff_trt.engines.trt_env import cuda_device_info, cuda_index, import_tensorrt
from modiff_trt.errors import ArtifactError, ModiffError
from modiff_trt.export.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from modiff_trt.export.naming import CONTEXT, EPS, T, X

log = logging.getLogger(__name__)


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


class Launcher(Protocol):
    """Where engines execute and their buffers live.

    Production: `CudaLauncher`, a dedicated CUDA stream. The CPU tests pass a host launcher
    from the runtime double instead, so the rest of the runner runs unchanged without a GPU.
    """

    device: torch.device  # where the runner allocates its buffers

    def handle(self) -> int:
        """The stream handle `execute_async_v3` enqueues on."""

    def ordered(self) -> Any:
        """Context manager: enclosed launches run on this stream, after the caller's pending work,
        and the caller's later work waits for them."""

    def capture(self, launch: Callable[[], bool]) -> Callable[[], None] | None:
        """Capture `launch` (which returns False when TensorRT refused the enqueue) into a
        replayable graph; None when the capture failed (it is ended and discarded)."""


class CudaLauncher:
    """A dedicated non-default CUDA stream on one GPU, with torch CUDA graphs for capture."""

    def __init__(self, index: int) -> None:
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(device=self.device)

    def handle(self) -> int:
        return self.stream.cuda_stream

    @contextmanager
    def ordered(self) -> Iterator[None]:
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    def capture(self, launch: Callable[[], bool]) -> Callable[[], None] | None:
        graph = torch.cuda.CUDAGraph()
        ok = False
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                ok = bool(launch())
        except RuntimeError as exc:  # cudaStreamEndCapture failed: the capture was invalidated
            log.debug("CUDA graph capture ended with an error: %s", exc)
            ok = False
        if not ok:
            graph.reset()
            return None
        return graph.replay


@dataclass
class _Bound:
    """Everything allocated for one batch size: fixed I/O buffers, state, contexts, graphs."""

    batch: int
    inputs: dict[str, torch.Tensor]  # x, t, context
    eps: torch.Tensor
    state: StateBuffers | None
    contexts: dict[str, Any] = field(default_factory=dict)  # arrangement name -> IExecutionContext
    graphs: dict[str, Callable[[], None]] = field(default_factory=dict)  # arrangement name -> replay
    eager: set[str] = field(default_factory=set)  # arrangements whose capture failed


class TensorRTRunner(StatefulRunner):
    """`warmup.plan` + `step.plan` (or `unet.plan`) of an export directory, on one GPU."""

    name = "trt"

    def __init__(
        self,
        export_dir: str | Path,
        manifest: Manifest | None = None,
        device: str | torch.device | int = "cuda",
        cuda_graph: bool = False,
        launcher: Launcher | None = None,
    ) -> None:
        export_dir = Path(export_dir)
        manifest = manifest or load_manifest(export_dir, verify_files=False)
        self.trt = import_tensorrt()
        self.gpu = cuda_index(device)
        gpu_name, capability = cuda_device_info(self.gpu)
        self.launcher = launcher or CudaLauncher(self.gpu)
        super().__init__(export_dir, manifest, self.launcher.device)
        self.cuda_graph = cuda_graph
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.engines: dict[str, Any] = {}
        manifest_sha256 = sha256_file(export_dir / MANIFEST_NAME)
        with torch.cuda.device(self.gpu):
            self._runtime = self.trt.Runtime(self._logger)
            for key, graph in self.manifest.graphs.items():
                self.engines[key] = self._load(key, graph.sha256, manifest_sha256, gpu_name, capability)
        self._bound: dict[int, _Bound] = {}

    def _load(self, key: str, onnx_sha256: str, manifest_sha256: str, gpu_name: str, capability: str) -> Any:
        plan = plan_path(self.export_dir, key)
        if not plan.is_file():
            raise ArtifactError(f"{plan} not found: build the engines with `modiff-trt build {self.export_dir}`")
        sidecar = read_sidecar(sidecar_path(plan))
        check_sidecar(
            sidecar,
            str(self.trt.__version__),
            gpu_name,
            capability,
            onnx_sha256,
            source=str(plan),
            manifest_sha256=manifest_sha256,
        )
        if sidecar.version_compatible:
            # Version-compatible plans embed a lean runtime that TensorRT must be allowed to load.
            self._runtime.engine_host_code_allowed = True
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {plan} (see its log); rebuild with `modiff-trt build`")
        return engine

    # -- StatefulRunner ---------------------------------------------------------------------

    def _run_impl(
        self, arrangement: Arrangement, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        with torch.cuda.device(self.gpu):
            bound = self._binding(x.shape[0], release_others=arrangement.read is None)
            # Inputs are copied on the caller's stream; `ordered` then makes the engine wait for them.
            for name, value in ((X, x), (T, t), (CONTEXT, context)):
                if name in bound.inputs:
                    bound.inputs[name].copy_(value.reshape(bound.inputs[name].shape))
            with self.launcher.ordered():
                self._execute(bound, arrangement)
            # A copy on the caller's stream, so the next call cannot overwrite what the sampler holds.
            return bound.eps.to(dtype=torch.float32, copy=True)

    def _state_set(self, index: int) -> Mapping[str, torch.Tensor]:
        return self._bound[self.batch].state.inputs(index)

    # -- internals --------------------------------------------------------------------------

    def _execute(self, bound: _Bound, arrangement: Arrangement) -> None:
        key = arrangement.name
        replay = bound.graphs.get(key)
        if replay is not None:
            replay()
            return
        context = bound.contexts[key]

        def launch() -> bool:
            return bool(context.execute_async_v3(self.launcher.handle()))

        if not launch():
            raise ModiffError(f"TensorRT execute_async_v3 failed for {key} (see the TensorRT log)")
        if self.cuda_graph and key not in bound.eager:
            # The eager run above produced this call's result and flushed TensorRT's deferred setup;
            # a capture only records work, so the state is untouched by it.
            replay = self.launcher.capture(launch)
            if replay is None:
                bound.eager.add(key)
                log.warning(
                    "CUDA graph capture failed for %s at batch %d: the engine enqueues work that "
                    "cannot be captured; that arrangement runs without a CUDA graph",
                    key,
                    bound.batch,
                )
            else:
                bound.graphs[key] = replay
                log.debug("captured a CUDA graph for %s at batch %d", key, bound.batch)

    def _binding(self, batch: int, release_others: bool) -> _Bound:
        """Buffers and contexts for `batch`, made once. A warm-up (`release_others`) frees those of
        other batch sizes: only the current trajectory's batch is in use."""
        if release_others:
            for other in [b for b in self._bound if b != batch]:
                del self._bound[other]
        if batch not in self._bound:
            self._bound[batch] = self._bind(batch)
        return self._bound[batch]

    def _bind(self, batch: int) -> _Bound:
        trt = self.trt
        first = next(iter(self.engines.values()))
        lo, _, hi = (shape[0] for shape in first.get_tensor_profile_shape(X, 0))
        if not lo <= batch <= hi:
            raise ModiffError(
                f"batch {batch} is outside the engines' profile [{lo}, {hi}]: rebuild with "
                f"`modiff-trt build {self.export_dir} --min-batch/--max-batch`"
            )
        modulated = self.manifest.modulated
        state = StateBuffers(layout_from_manifest(self.manifest, batch), self.device) if modulated else None
        inputs: dict[str, torch.Tensor] = {}
        for name in (X, T, CONTEXT):
            if _is_input(trt, first, name):
                shape = _batch_shape(first.get_tensor_shape(name), batch)
                inputs[name] = aligned_empty(shape, torch_dtype_for(trt, first.get_tensor_dtype(name)), self.device)
        eps_shape = _batch_shape(first.get_tensor_shape(EPS), batch)
        eps = aligned_empty(eps_shape, torch_dtype_for(trt, first.get_tensor_dtype(EPS)), self.device)
        bound = _Bound(batch, inputs, eps, state)
        for arrangement in self.arrangements.all:
            bound.contexts[arrangement.name] = self._make_context(arrangement, bound)
        return bound

    def _make_context(self, arrangement: Arrangement, bound: _Bound) -> Any:
        """An execution context for `arrangement` with every I/O address set by tensor name."""
        trt = self.trt
        engine = self.engines[arrangement.graph]
        context = engine.create_execution_context()
        if context is None:
            raise ModiffError(
                f"TensorRT could not create an execution context for {arrangement.name} "
                "(out of GPU memory?): use a smaller batch"
            )
        state_in = bound.state.inputs(arrangement.read) if arrangement.read is not None else {}
        state_out = bound.state.outputs(arrangement.write) if arrangement.write is not None else {}
        # Step groups: the step graph also reads the one `step_scale_ratio` buffer (any batch, refilled per call).
        ratios = (
            {self.step_scales.name: self.step_scales.buffer}
            if (self.step_scales is not None and arrangement.graph == "step")
            else {}
        )
        tensors = {"input": {**bound.inputs, **state_in, **ratios}, "output": {EPS: bound.eps, **state_out}}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            tensor = tensors[mode].get(name)
            if tensor is None:
                raise ArtifactError(
                    f"{arrangement.name} engine tensor {name!r} is not described by {self.export_dir}/manifest.json: "
                    "the plans and the manifest come from different exports; rebuild with `modiff-trt build`"
                )
            expected = torch_dtype_for(trt, engine.get_tensor_dtype(name))
            if tensor.dtype != expected:
                raise ArtifactError(
                    f"{name}: the engine wants {expected}, the manifest says {tensor.dtype} (state_dtype): "
                    "re-export and rebuild"
                )
            if mode == "input" and not context.set_input_shape(name, tuple(tensor.shape)):
                raise ModiffError(f"TensorRT rejected shape {tuple(tensor.shape)} for {name}")
            if tensor.data_ptr() % ALIGNMENT:
                raise ModiffError(f"{name} buffer is not {ALIGNMENT}-byte aligned")
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise ModiffError(f"TensorRT rejected the buffer address of {name} for {arrangement.name}")
        unbound = sorted(set(tensors["input"]) - set(names))
        if unbound:
            raise ArtifactError(
                f"the {arrangement.graph} plan lacks inputs {unbound[:5]} that the manifest lists: "
                "rebuild with `modiff-trt build`"
            )
        for name in names:
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                got = tuple(context.get_tensor_shape(name))
                want = tuple(tensors["output"][name].shape)
                if got != want:
                    raise ArtifactError(f"{name}: the engine produces {got} but the manifest's layer table says {want}")
        return context


def _is_input(trt: Any, engine: Any, name: str) -> bool:
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    return name in names and engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT


def _batch_shape(dims: Any, batch: int) -> tuple[int, ...]:
    dims = tuple(int(d) for d in dims)
    return (batch, *dims[1:])
