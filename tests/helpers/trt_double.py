"""A double of the TensorRT Python runtime for CPU tests. It is NOT TensorRT.

Its "engines" run the ONNX graph a plan was "built" from with ONNX Runtime on the CPU, on the
very memory the runner hands to `set_tensor_address`. That lets CI run the whole `trt` backend
(engine loading and sidecar checks, bindings by tensor name, ping-pong state sets, padding,
per-batch contexts, CUDA-graph capture and replay, device scoping) and the builder's use of the
API (flags, profiles, timing cache, sidecars) without a GPU. It proves that modiff-trt drives
the API as written; it says nothing about whether TensorRT parses, builds or computes the
graphs correctly: only the `-m gpu` tests (tests/test_trt_gpu.py) can.

What it models, from the TensorRT 10.x/11.x Python API:

- `Builder` / `OnnxParser` / `IBuilderConfig`: flags (TF32 on by default, as in TensorRT),
  profiling verbosity, one optimization profile (`add_optimization_profile` returns -1 for an
  invalid one), timing caches (`set_timing_cache` returns False for a foreign cache);
  `build_serialized_network` returns a JSON "plan" naming the ONNX file.
- `Runtime.deserialize_cuda_engine`: None for a version-compatible plan unless
  `engine_host_code_allowed` (TensorRT refuses the embedded lean runtime without it).
- Engines list their I/O tensors in REVERSED graph order, so a runner that bound by position
  instead of by name would feed the wrong tensors.
- `execute_async_v3` on a stream that is being captured records the launch instead of running
  it (CUDA stream-capture semantics); `capture_fails` makes chosen engines refuse capture.
- Simulated GPUs: `torch.cuda`'s device queries are patched so that `torch.cuda.device(i)`
  switches a "current device" that every recorded event notes.
"""

from __future__ import annotations

import enum
import json
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

DOUBLE_TAG = "modiff-trt TensorRT runtime double"


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1
    TF32 = 7
    VERSION_COMPATIBLE = 16


class ProfilingVerbosity(enum.Enum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


_NUMPY_TO_TRT = {np.dtype(member.value): member for member in DataType}


@dataclass
class DoubleState:
    """What the tests configure and read back."""

    version: str
    threads: int
    capture_fails: set[str] = field(default_factory=set)  # engine keys (ONNX file stems) that refuse capture
    refuse_timing_cache: bool = False  # every non-empty timing cache is "from another GPU"
    refuse_profiles: bool = False  # add_optimization_profile returns -1
    no_timing_cache: bool = False  # get_timing_cache returns None
    refuse_addresses: set[str] = field(default_factory=set)  # set_tensor_address returns False for these
    events: list[tuple[str, str, int]] = field(default_factory=list)  # (event, detail, current device)
    launchers: dict[int, HostLauncher] = field(default_factory=dict)
    executions: int = 0

    def note(self, event: str, detail: str = "") -> None:
        self.events.append((event, detail, torch.cuda.current_device()))


class HostLauncher:
    """The runner's launcher on host memory: ordering is trivial, capture records launches."""

    device = torch.device("cpu")

    def __init__(self, state: DoubleState) -> None:
        self._state = state
        self._handle = 1000 + len(state.launchers)
        state.launchers[self._handle] = self
        self.capturing: list[Callable[[], bool]] | None = None

    def handle(self) -> int:
        return self._handle

    def ordered(self) -> Any:
        return nullcontext()

    def capture(self, launch: Callable[[], bool]) -> Callable[[], None] | None:
        self.capturing = []
        try:
            ok = launch()
        finally:
            recorded, self.capturing = self.capturing, None
        if not ok:
            return None

        def replay() -> None:
            for work in recorded:
                work()

        return replay


# -- builder --------------------------------------------------------------------------------------


class _Tensor:
    def __init__(self, name: str) -> None:
        self.name = name


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx: Path | None = None
        self.inputs: list[str] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> _Tensor:
        return _Tensor(self.inputs[index])


class _OnnxParser:
    def __init__(self, network: _Network, logger: Any) -> None:
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path, load_external_data=False)
        self.network.onnx = Path(path).resolve()
        self.network.inputs = [value.name for value in model.graph.input]
        return True

    def get_error(self, index: int) -> Any:
        raise IndexError(index)


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        self.shapes[name] = [list(low), list(opt), list(high)]


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data or b"double-timing-cache"


class _BuilderConfig:
    def __init__(self, state: DoubleState) -> None:
        self._state = state
        self.flags = {BuilderFlag.TF32}  # TensorRT's default
        self.profiles: list[_Profile] = []
        self.timing_cache: _TimingCache | None = None
        self.builder_optimization_level = 3
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.pools: dict[MemoryPoolType, int] = {}

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: _Profile) -> int:
        valid = all(lo[i] <= op[i] <= hi[i] for lo, op, hi in profile.shapes.values() for i in range(len(lo)))
        if not profile.shapes or not valid or self._state.refuse_profiles:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        if cache.data and self._state.refuse_timing_cache and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache | None:
        return None if self._state.no_timing_cache else self.timing_cache


class _Builder:
    def __init__(self, state: DoubleState) -> None:
        self._state = state

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _BuilderConfig:
        return _BuilderConfig(self._state)

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _BuilderConfig) -> bytes | None:
        self._state.note("build", network.onnx.stem)
        plan = {
            "tag": DOUBLE_TAG,
            "onnx": str(network.onnx),
            "version": self._state.version,
            "profile": config.profiles[0].shapes,
            "flags": sorted(flag.name for flag in config.flags),
            "profiling_verbosity": config.profiling_verbosity.name,
            "device": torch.cuda.current_device(),
        }
        return json.dumps(plan).encode()


# -- runtime --------------------------------------------------------------------------------------


class _Engine:
    def __init__(self, state: DoubleState, plan: dict[str, Any]) -> None:
        import onnxruntime as ort

        self._state, self.plan = state, plan
        self.key = Path(plan["onnx"]).stem
        graph = onnx.load(plan["onnx"], load_external_data=False).graph
        self.specs: dict[str, tuple[TensorIOMode, DataType, list[int | str]]] = {}
        for mode, values in ((TensorIOMode.INPUT, graph.input), (TensorIOMode.OUTPUT, graph.output)):
            for value in values:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
                dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                self.specs[value.name] = (mode, _NUMPY_TO_TRT[np.dtype(dtype)], dims)
        self.names = list(reversed(self.specs))  # not the graph order: binding must go by name
        options = ort.SessionOptions()
        options.intra_op_num_threads = state.threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(plan["onnx"], options, providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.specs[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.specs[name][1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.specs[name][2])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(shape) for shape in self.plan["profile"][name])

    def create_execution_context(self) -> _Context:
        self._state.note("create_execution_context", self.key)
        return _Context(self._state, self)


class _Context:
    def __init__(self, state: DoubleState, engine: _Engine) -> None:
        self._state, self.engine = state, engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(low) or not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.specs or name in self._state.refuse_addresses:
            return False
        self._state.note("set_tensor_address", name)
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes[name]
        batch = self.shapes["x"][0]
        return tuple(batch if not isinstance(d, int) else d for d in self.engine.specs[name][2])

    def execute_async_v3(self, stream_handle: int) -> bool:
        launcher = self._state.launchers.get(stream_handle)
        if launcher is not None and launcher.capturing is not None:
            if self.engine.key in self._state.capture_fails:
                return False
            launcher.capturing.append(self._run)
            return True
        return self._run()

    def _run(self) -> bool:
        self._state.note("execute", self.engine.key)
        self._state.executions += 1
        binding = self.engine.session.io_binding()
        for name, (mode, dtype, _) in self.engine.specs.items():
            bind = binding.bind_input if mode == TensorIOMode.INPUT else binding.bind_output
            bind(name, "cpu", 0, np.dtype(dtype.value), list(self.get_tensor_shape(name)), self.addresses[name])
        self.engine.session.run_with_iobinding(binding)
        return True


class _Runtime:
    def __init__(self, state: DoubleState, logger: Any) -> None:
        self._state = state
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
        try:
            plan = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if plan.get("tag") != DOUBLE_TAG:
            return None
        if "VERSION_COMPATIBLE" in plan["flags"] and not self.engine_host_code_allowed:
            return None  # TensorRT refuses an embedded lean runtime unless host code is allowed
        self._state.note("deserialize", Path(plan["onnx"]).stem)
        return _Engine(self._state, plan)


class _Logger:
    WARNING = 2

    def __init__(self, level: int = WARNING) -> None:
        self.level = level


def make_double(version: str = "10.13.0.35", threads: int = 2) -> types.ModuleType:
    """A `tensorrt`-shaped module backed by ONNX Runtime; `.state` holds settings and events."""
    state = DoubleState(version, threads)
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.state = state
    module.DataType, module.TensorIOMode, module.BuilderFlag = DataType, TensorIOMode, BuilderFlag
    module.ProfilingVerbosity, module.MemoryPoolType = ProfilingVerbosity, MemoryPoolType
    module.NetworkDefinitionCreationFlag, module.Logger = NetworkDefinitionCreationFlag, _Logger
    module.Builder = lambda logger: _Builder(state)
    module.OnnxParser = _OnnxParser
    module.Runtime = lambda logger: _Runtime(state, logger)
    module.host_launcher = lambda: HostLauncher(state)
    return module


class SimulatedGPUs:
    """Patches torch.cuda's device queries: `torch.cuda.device(i)` switches a current-device index."""

    def __init__(self, names: list[str], capability: tuple[int, int] = (9, 0)) -> None:
        self.names, self.capability, self.current = names, capability, 0

    def _index(self, device: Any = None) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        index = torch.device(device).index
        return self.current if index is None else index

    @contextmanager
    def device(self, device: Any) -> Iterator[None]:
        previous, self.current = self.current, self._index(device)
        try:
            yield
        finally:
            self.current = previous

    def install(self, monkeypatch: Any) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: len(self.names))
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_device_name", lambda device=None: self.names[self._index(device)])
        monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: self.capability)
        monkeypatch.setattr(cuda, "device", self.device)


def install_double(
    monkeypatch: Any, version: str = "10.13.0.35", gpus: tuple[str, ...] = ("Double GPU 0",), threads: int = 2
) -> types.ModuleType:
    """Make `import tensorrt` return the double and torch.cuda report `gpus`; undone by monkeypatch."""
    double = make_double(version, threads)
    SimulatedGPUs(list(gpus)).install(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", double)
    return double
