"""Build TensorRT plans (`warmup.plan`, `step.plan` or `unet.plan`) from an export directory.

The engines are strongly typed: precision comes from the graph (fp16 float parts, explicit
int8 Q/DQ), never from builder flags. TensorRT 11 has no other mode; on 10.x we set the
STRONGLY_TYPED network flag and none of the deprecated INT8/FP16 flags or calibrators. Every
state input gets the same batch range as `x` in the one optimization profile, because the
state of a batch has the batch's size.

Two builder defaults are overridden. TF32 (on by default) is cleared unless asked for: it
rounds fp32 matmul inputs to 10-bit mantissas, which moves `x - a_hat` across int8 rounding
boundaries. Profiling verbosity stays at TensorRT's default (layer names only) unless
`detailed_profile`: DETAILED adds NVTX payload and enqueue latency to every run.

Each plan is written to a temp name and renamed, then its sidecar (see `sidecar.py`) is
written, so a crash never leaves a plan that looks valid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from modiff_trt import __version__
from modiff_trt.atomic import atomic_write
from modiff_trt.engines.sidecar import EngineSidecar, sidecar_path, write_sidecar
from modiff_trt.engines.trt_env import cuda_device_info, cuda_index, import_tensorrt, trt_major
from modiff_trt.errors import ArtifactError, ConfigError, ModiffError
from modiff_trt.export.manifest import MANIFEST_NAME, GraphSpec, Manifest, load_manifest, sha256_file
from modiff_trt.export.naming import UNBATCHED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileShape:
    """min/opt/max shape of one engine input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes an engine accepts (min <= opt <= max)."""

    min: int
    opt: int
    max: int


def resolve_batch_range(
    manifest: Manifest, min_batch: int | None, opt_batch: int | None, max_batch: int | None
) -> BatchRange:
    """Fill in defaults and check the batch range against the export.

    A graph exported with a fixed batch accepts only that batch, so a different request is an
    error rather than a silent override. Defaults for a dynamic batch: min 1, opt = max, max 16
    (opt is where TensorRT times its tactics: set it to the batch you sample with).
    """
    fixed = manifest.batch_size
    if fixed is not None:
        for label, value in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch)):
            if value is not None and value != fixed:
                raise ConfigError(
                    f"{label} {value} conflicts with the export's fixed batch size {fixed}: re-export with a "
                    "dynamic batch (`modiff-trt export --batch-size dynamic`) or drop the option"
                )
        return BatchRange(fixed, fixed, fixed)
    max_b = max_batch if max_batch is not None else max(16, opt_batch or 0, min_batch or 0)
    opt_b = opt_batch if opt_batch is not None else max_b
    min_b = min_batch if min_batch is not None else 1
    if not 1 <= min_b <= opt_b <= max_b:
        raise ConfigError(f"batch range must satisfy 1 <= min <= opt <= max, got min {min_b}, opt {opt_b}, max {max_b}")
    return BatchRange(min_b, opt_b, max_b)


def profile_shapes(graph: GraphSpec, batch: BatchRange, source: str = "graph") -> dict[str, ProfileShape]:
    """The optimization-profile shape of every input of `graph` (x, t, context, state inputs).

    Dim 0 of every input is the batch (`'batch'` or an int in the manifest) and follows `x`;
    all other dims must be static ints, which is what the exporter writes. `step_scale_ratio`
    (step groups) is not batched: its shape is fixed.
    """
    shapes: dict[str, ProfileShape] = {}
    for tensor in graph.inputs:
        if tensor.name in UNBATCHED:
            fixed = tuple(int(d) for d in tensor.shape)
            shapes[tensor.name] = ProfileShape(fixed, fixed, fixed)
            continue
        if not tensor.shape:
            raise ArtifactError(f"{source}: input {tensor.name} is a scalar; every input needs a batch dim")
        rest = tensor.shape[1:]
        if any(not isinstance(d, int) for d in rest):
            raise ArtifactError(
                f"{source}: input {tensor.name} has a dynamic non-batch dim {tensor.shape}; re-export with static "
                "sample shapes"
            )
        dims = tuple(int(d) for d in rest)
        shapes[tensor.name] = ProfileShape((batch.min, *dims), (batch.opt, *dims), (batch.max, *dims))
    return shapes


def plan_path(export_dir: str | Path, graph_key: str) -> Path:
    """Where the plan for graph `graph_key` ('warmup' | 'step' | 'unet') lives."""
    return Path(export_dir) / f"{graph_key}.plan"


def parser_errors(parser: Any) -> list[str]:
    """The ONNX parser's errors as 'node <name> (<op>): <description>' lines."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = _call_or(error, "node_name", "") or f"#{_call_or(error, 'node', '?')}"
        op = _call_or(error, "node_operator", "")
        desc = _call_or(error, "desc", str(error))
        lines.append(f"node {node}{f' ({op})' if op else ''}: {desc}")
    return lines


def _call_or(obj: Any, method: str, default: Any) -> Any:
    """Call an optional accessor (ParserError grew node_name/node_operator in 8.6+/10.x)."""
    func = getattr(obj, method, None)
    if func is None:
        return default
    try:
        return func()
    except Exception:  # noqa: BLE001 - a missing detail must not hide the error itself
        return default


@dataclass
class _BuildOptions:
    workspace_gb: float | None
    opt_level: int
    timing_cache: Path | None
    version_compatible: bool
    tf32: bool
    detailed_profile: bool


def build_engines(
    export_dir: str | Path,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_gb: float | None = None,
    opt_level: int = 3,
    timing_cache: str | Path | None = None,
    version_compatible: bool = False,
    tf32: bool = False,
    detailed_profile: bool = False,
    device: str | int | None = None,
) -> list[Path]:
    """Build one plan per graph of the export (warm-up + step, or the plain UNet).

    Returns the plan paths. The manifest, target and batch range are checked before TensorRT
    is imported, so a wrong directory or range fails fast even on a machine without a GPU.
    `timing_cache` is read if it exists and written back after the builds: it makes rebuilds of
    the same layers (other batch ranges, other exports of the same model) much faster.
    `device` ('cuda:1', 1; default the current GPU) is made current for the whole build, and
    the sidecars record that GPU.
    """
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    manifest_sha256 = sha256_file(export_dir / MANIFEST_NAME)
    if manifest.export.target == "ort-cpu":
        raise ConfigError(
            f"{export_dir} was exported for target 'ort-cpu' (integer ONNX Runtime kernels TensorRT cannot parse): "
            "re-export with `modiff-trt export --target trt --float fp16`"
        )
    batch = resolve_batch_range(manifest, min_batch, opt_batch, max_batch)
    if not 0 <= opt_level <= 5:
        raise ConfigError(f"--opt-level must be 0..5 (TensorRT builder optimization level), got {opt_level}")
    if manifest.export.float_dtype != "float16":
        log.warning(
            "%s was exported with float=%s: a strongly typed engine keeps that precision (TensorRT 11 builds "
            "fp32 engines from fp32 graphs); re-export with `--float fp16` for speed",
            export_dir,
            manifest.export.float_dtype,
        )
    shapes = {
        key: profile_shapes(graph, batch, source=str(export_dir / graph.file)) for key, graph in manifest.graphs.items()
    }
    trt = import_tensorrt()
    index = cuda_index(device)
    gpu_name, capability = cuda_device_info(index)
    options = _BuildOptions(
        workspace_gb,
        opt_level,
        Path(timing_cache) if timing_cache else None,
        version_compatible,
        tf32,
        detailed_profile,
    )
    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    plans = []
    with torch.cuda.device(index):
        for key, graph in manifest.graphs.items():
            plan, cache_bytes = _build_one(
                trt,
                logger,
                export_dir,
                key,
                graph,
                shapes[key],
                options,
                cache_bytes,
                gpu_name,
                capability,
                manifest_sha256,
            )
            plans.append(plan)
    if options.timing_cache and cache_bytes:
        atomic_write(options.timing_cache, cache_bytes)
        log.info("timing cache written to %s", options.timing_cache)
    return plans


def _build_one(
    trt: ModuleType,
    logger: Any,
    export_dir: Path,
    key: str,
    graph: GraphSpec,
    shapes: dict[str, ProfileShape],
    options: _BuildOptions,
    cache_bytes: bytes,
    gpu_name: str,
    capability: str,
    manifest_sha256: str,
) -> tuple[Path, bytes]:
    """Parse, configure, build and write one plan + sidecar; returns (plan, updated timing cache)."""
    onnx_path = export_dir / graph.file
    builder = trt.Builder(logger)
    # TensorRT 11: every network is strongly typed and the flag is not needed. 10.x: opt in.
    flags = 0 if trt_major(trt) >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok or parser.num_errors:
        details = "\n  ".join(parser_errors(parser)) or "(the parser reported no details)"
        raise ArtifactError(
            f"TensorRT {trt.__version__} could not parse {onnx_path}:\n  {details}\nCheck the graph with "
            "`modiff-trt inspect DIR` (TensorRT needs symmetric Q/DQ with constant scales and opset 13+), "
            "then re-export"
        )
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if network_inputs != set(shapes):
        raise ArtifactError(
            f"{onnx_path} inputs {sorted(network_inputs)} differ from the manifest's {sorted(shapes)}: "
            "the directory mixes two exports; re-run `modiff-trt export`"
        )

    config = builder.create_builder_config()
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = options.opt_level
    verbosity = "detailed" if options.detailed_profile else "layer_names_only"
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, verbosity.upper())
    tf32 = getattr(trt.BuilderFlag, "TF32", None)  # by name: a release without the flag has no TF32 to clear
    if tf32 is not None and not options.tf32:
        config.clear_flag(tf32)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, shape.min, shape.opt, shape.max)
    if config.add_optimization_profile(profile) < 0:
        raise ArtifactError(
            f"TensorRT rejected the optimization profile of {onnx_path} ({_profile_text(shapes)}): the batch range "
            "does not fit the graph's inputs; check --min/--opt/--max-batch against the export"
        )
    _attach_timing_cache(config, cache_bytes, options.timing_cache)

    log.info("building %s.plan from %s (TensorRT %s, %s)", key, onnx_path.name, trt.__version__, gpu_name)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise ModiffError(
            f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above); try a larger "
            "--workspace-gb or a smaller --max-batch"
        )

    plan = plan_path(export_dir, key)
    side = sidecar_path(plan)
    side.unlink(missing_ok=True)  # never leave an old sidecar vouching for a new plan
    atomic_write(plan, bytes(memoryview(serialized)))
    write_sidecar(
        EngineSidecar(
            engine=key,
            plan_file=plan.name,
            onnx_file=graph.file,
            onnx_sha256=graph.sha256,
            manifest_sha256=manifest_sha256,
            tensorrt_version=str(trt.__version__),
            gpu_name=gpu_name,
            compute_capability=capability,
            profile={name: shape.to_dict() for name, shape in shapes.items()},
            build_seconds=round(seconds, 3),
            modiff_trt_version=__version__,
            version_compatible=options.version_compatible,
            builder={
                "workspace_gb": options.workspace_gb,
                "optimization_level": options.opt_level,
                "timing_cache": str(options.timing_cache) if options.timing_cache else None,
                "strongly_typed": True,
                "tf32": bool(options.tf32 and tf32 is not None),
                "profiling_verbosity": verbosity,
                "device": torch.cuda.current_device(),
            },
        ),
        side,
    )
    log.info("wrote %s (%.1f s)", plan, seconds)
    cache = config.get_timing_cache()
    return plan, (bytes(memoryview(cache.serialize())) if cache is not None else cache_bytes)


def _attach_timing_cache(config: Any, cache_bytes: bytes, source: Path | None) -> None:
    """Give the builder a timing cache: `cache_bytes`, or a fresh one when TensorRT refuses them
    (a cache from another GPU or TensorRT release), with a warning naming the file."""
    if config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False):
        return
    if cache_bytes:
        log.warning(
            "TensorRT refused the timing cache %s (made on another GPU or TensorRT release?): building "
            "with a fresh cache, which will replace it",
            source,
        )
        if config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            return
    log.warning("TensorRT refused a timing cache: building without one")


def _profile_text(shapes: dict[str, ProfileShape]) -> str:
    x = shapes.get("x")
    return "no x input" if x is None else f"x min {list(x.min)}, opt {list(x.opt)}, max {list(x.max)}"
