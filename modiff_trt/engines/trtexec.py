"""Profile a plan with NVIDIA's `trtexec`: command line, input files, output parsing.

Why trtexec rather than timing our own loop: it is the tool NVIDIA and its users quote, it
separates GPU compute from enqueue and transfer time, and its per-layer profile names the slow
layers. Why load inputs: the step engine's speed depends on its state inputs only through
their shapes, but a zero or random state can hit different Q/DQ saturation paths than a real
one, so by default the state files come from a real warm-up step (run with ONNX Runtime on
the CPU, no GPU needed), with zeros as the fallback.

Flags are version-aware: TensorRT 10.x takes `--stronglyTyped` (when building from ONNX),
`--useCudaGraph` and `--noDataTransfers`; 11.x made them no-ops, so they are left out. A
version-compatible plan needs `--versionCompatible`: trtexec only lets the runtime load the
plan's embedded lean runtime (engine host code) with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modiff_trt.atomic import atomic_write
from modiff_trt.engines.sidecar import EngineSidecar, read_sidecar, sidecar_path, version_problem
from modiff_trt.engines.trt_build import plan_path
from modiff_trt.errors import ArtifactError, BackendUnavailableError, ModiffError
from modiff_trt.export.manifest import GraphSpec, Manifest, load_manifest
from modiff_trt.export.naming import CONTEXT, STEP_SCALE_RATIO, UNBATCHED, T, X

log = logging.getLogger(__name__)

SUMMARY_HEADER = "=== Performance summary ==="
_PREFIX = re.compile(r"^(?:\[[^\]]*\]\s*)*")  # "[11/22/2026-05:00:00] [I] " prefixes
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-+0-9.eE]+)\s*ms")


def shape_spec(shapes: Mapping[str, Sequence[int]]) -> str:
    """`{'x': [4, 3, 32, 32], 't': [4]}` -> `x:4x3x32x32,t:4` (trtexec's shape syntax)."""
    return ",".join(f"{_quote(name)}:{'x'.join(str(int(d)) for d in dims)}" for name, dims in shapes.items())


def _quote(name: str) -> str:
    # trtexec splits specs on ':' and ','; names containing them must be single-quoted.
    return f"'{name}'" if (":" in name or "," in name) else name


def load_inputs_spec(files: Mapping[str, str | Path]) -> str:
    """`--loadInputs` value `name:path,...`; paths with ',' or ':' are refused (trtexec splits on them
    and only tensor names can be quoted)."""
    for path in files.values():
        if "," in str(path) or ":" in str(path):
            raise ModiffError(
                f"trtexec cannot load {path}: its --loadInputs splits on ',' and ':', and only tensor names "
                "can be quoted; move the export directory to a path without ',' or ':'"
            )
    return ",".join(f"{_quote(n)}:{p}" for n, p in files.items())


def build_trtexec_command(
    source: str | Path,
    trt_major: int,
    shapes: Mapping[str, Sequence[int]],
    load_inputs: Mapping[str, str | Path] | None = None,
    per_layer: bool = False,
    profile_json: str | Path | None = None,
    layer_info_json: str | Path | None = None,
    trtexec: str = "trtexec",
    duration_s: float | None = None,
    warmup_ms: int | None = None,
    version_compatible: bool = False,
) -> list[str]:
    """The argument list (no shell) that benchmarks `source` (a `.plan` or an `.onnx`).

    `per_layer` adds the per-layer profiling flags; the profile is then taken in a separate run
    (`--separateProfileRun`) so the summary numbers are not inflated by the profiler.
    `version_compatible`: the plan was built so; trtexec then allows its embedded lean runtime.
    """
    source = Path(source)
    cmd = [trtexec]
    if source.suffix == ".onnx":
        cmd.append(f"--onnx={source}")
        if trt_major < 11:
            cmd.append("--stronglyTyped")
    else:
        cmd.append(f"--loadEngine={source}")
    if version_compatible:
        cmd.append("--versionCompatible")
    if shapes:
        cmd.append(f"--shapes={shape_spec(shapes)}")
    if load_inputs:
        cmd.append(f"--loadInputs={load_inputs_spec(load_inputs)}")
    if trt_major < 11:
        cmd += ["--useCudaGraph", "--noDataTransfers"]
    if warmup_ms is not None:
        cmd.append(f"--warmUp={int(warmup_ms)}")
    if duration_s is not None:
        cmd.append(f"--duration={duration_s:g}")
    if per_layer:
        cmd += ["--dumpProfile", "--separateProfileRun", "--profilingVerbosity=detailed"]
        if profile_json is not None:
            cmd.append(f"--exportProfile={profile_json}")
        if layer_info_json is not None:
            cmd.append(f"--exportLayerInfo={layer_info_json}")
    return cmd


@dataclass
class TimingStats:
    """One `Name: min = .. ms, max = .., mean = .., median = .., percentile(90%) = ..` line (ms)."""

    min: float | None = None
    max: float | None = None
    mean: float | None = None
    median: float | None = None
    percentiles: dict[str, float] = field(default_factory=dict)  # "90" -> ms


@dataclass
class PerformanceSummary:
    """trtexec's `=== Performance summary ===` block, times in ms (totals in s)."""

    throughput_qps: float | None
    metrics: dict[str, TimingStats]  # "Latency", "Enqueue Time", "H2D Latency", "GPU Compute Time", ...
    totals: dict[str, float] = field(default_factory=dict)  # "Total Host Walltime" -> s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def gpu_compute(self) -> TimingStats | None:
        return self.metrics.get("GPU Compute Time")


def parse_performance_summary(text: str) -> PerformanceSummary:
    """Parse the lines after `=== Performance summary ===` (log prefixes allowed)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if SUMMARY_HEADER in line), None)
    if start is None:
        raise ModiffError(f"no '{SUMMARY_HEADER}' in the trtexec output: the run failed or was cut short (see the log)")
    throughput = None
    metrics: dict[str, TimingStats] = {}
    totals: dict[str, float] = {}
    for raw in lines[start + 1 :]:
        line = _PREFIX.sub("", raw).strip()
        if line.startswith("==="):
            break
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "Throughput":
            match = re.search(r"([-+0-9.eE]+)\s*qps", rest)
            throughput = float(match.group(1)) if match else None
        elif key.startswith("Total "):
            match = re.search(r"([-+0-9.eE]+)\s*s\b", rest)
            if match:
                totals[key] = float(match.group(1))
        else:
            stats = TimingStats()
            for name, pct, value in _STAT.findall(rest):
                if pct:
                    stats.percentiles[pct.rstrip("0").rstrip(".") if "." in pct else pct] = float(value)
                else:
                    setattr(stats, name, float(value))
            if stats.median is not None or stats.mean is not None:
                metrics[key] = stats
    return PerformanceSummary(throughput, metrics, totals)


@dataclass
class LayerTime:
    """One layer of a `--exportProfile` JSON."""

    name: str
    total_ms: float
    average_ms: float
    median_ms: float | None
    percentage: float


@dataclass
class LayerProfileSummary:
    """The slowest layers of an exported profile."""

    runs: int
    total_average_ms: float
    layers: list[LayerTime]  # top-N by average time, slowest first

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize_layer_profile(profile: str | Path | list[dict[str, Any]], top: int = 15) -> LayerProfileSummary:
    """Top-`top` layers of a trtexec `--exportProfile` file: `[{"count": N}, {"name", "timeMs", ...}, ...]`."""
    if isinstance(profile, (str, Path)):
        try:
            data = json.loads(_bare_non_finite(Path(profile).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"cannot read the layer profile {profile} ({exc}): re-run with --per-layer") from exc
    else:
        data = profile
    if not isinstance(data, list) or not data:
        raise ArtifactError("the layer profile is not a trtexec --exportProfile list")
    runs = int(data[0].get("count", 0)) if isinstance(data[0], dict) and "count" in data[0] else 0
    layers = [
        LayerTime(
            name=str(item["name"]),
            total_ms=_finite(item.get("timeMs")) or 0.0,
            average_ms=_finite(item.get("averageMs")) or 0.0,
            median_ms=_finite(item.get("medianMs")),
            percentage=_finite(item.get("percentage")) or 0.0,
        )
        for item in data
        if isinstance(item, dict) and "name" in item
    ]
    layers.sort(key=lambda layer: layer.average_ms, reverse=True)
    return LayerProfileSummary(runs, sum(layer.average_ms for layer in layers), layers[:top])


_NON_FINITE = re.compile(r"([:\[,]\s*)(-?)(nan|inf)\b", re.IGNORECASE)


def _bare_non_finite(text: str) -> str:
    """trtexec writes C's `nan`/`-nan`/`inf` into --exportProfile JSON (a layer too fast to time):
    turn them into the NaN/Infinity tokens Python's json reads."""
    return _NON_FINITE.sub(
        lambda m: m.group(1) + ("NaN" if m.group(3).lower() == "nan" else m.group(2) + "Infinity"), text
    )


def _finite(value: Any) -> float | None:
    """A finite float, or None for missing/NaN/Inf entries."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _batch_shape(dims: Sequence[int | str], batch: int, name: str = "") -> list[int]:
    if name in UNBATCHED:
        return [int(d) for d in dims]
    return [batch, *(int(d) for d in dims[1:])]


def write_input_files(
    graph: GraphSpec,
    batch: int,
    out_dir: str | Path,
    values: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Path]:
    """One raw binary file per input (trtexec `--loadInputs` format: the tensor's bytes, C order).

    Inputs without a value in `values` are zeros (state, context) or, for `x`, a seeded normal
    sample and for `t` the middle of the schedule.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = dict(values or {})
    rng = np.random.default_rng(0)
    files = {}
    for tensor in graph.inputs:
        shape = _batch_shape(tensor.shape, batch, tensor.name)
        dtype = np.dtype(tensor.dtype)
        if tensor.name in values:
            array = np.asarray(values[tensor.name])
            if list(array.shape) != shape:
                raise ModiffError(f"input {tensor.name}: value has shape {list(array.shape)}, the engine wants {shape}")
        elif tensor.name == X:
            array = rng.standard_normal(shape)
        elif tensor.name == T:
            array = np.full(shape, 500.0)
        else:
            array = np.zeros(shape)
        path = out_dir / f"{tensor.name}.bin"
        atomic_write(path, np.ascontiguousarray(array.astype(dtype)).tobytes())
        files[tensor.name] = path
    return files


def warmup_state(export_dir: str | Path, manifest: Manifest, batch: int) -> dict[str, np.ndarray]:
    """x, t (, context) and the state after one real warm-up step, keyed by step-graph input name.

    The warm-up runs through the `ort` backend on the CPU (the same `StatefulRunner` every
    backend uses, so the state files hold exactly what the step engine reads after a warm-up).
    """
    import torch

    from modiff_trt.engines.ort_backend import OrtRunner

    runner = OrtRunner(export_dir, manifest=manifest, provider="cpu")
    rng = np.random.default_rng(0)
    values = {
        X: torch.from_numpy(rng.standard_normal((batch, *runner.inputs.sample_shape)).astype(np.float32)),
        T: torch.full((batch,), 500.0),
    }
    if runner.inputs.context_shape is not None:
        values[CONTEXT] = torch.zeros(batch, *runner.inputs.context_shape)
    runner(values[X], values[T], values.get(CONTEXT))
    return {name: tensor.numpy() for name, tensor in {**values, **runner.state()}.items()}


@dataclass
class ProfileResult:
    """What `profile_engine` did: the command, and the parsed numbers when it ran."""

    command: list[str]
    engine: str
    batch: int
    summary: PerformanceSummary | None = None
    layers: LayerProfileSummary | None = None
    json_path: Path | None = None
    log_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "engine": self.engine,
            "batch": self.batch,
            "summary": self.summary.to_dict() if self.summary else None,
            "layers": self.layers.to_dict() if self.layers else None,
        }


_BANNER = re.compile(r"\[TensorRT v(\d+)\]")


def trtexec_version(trtexec: str) -> str | None:
    """The TensorRT release a trtexec binary belongs to ("10.3.0"), from the banner every run prints
    (`&&&& RUNNING TensorRT.trtexec [TensorRT v100300] ...`); None when it cannot be read."""
    try:
        proc = subprocess.run([trtexec, "--help"], capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not run `%s --help` to read its TensorRT version: %s", trtexec, exc)
        return None
    match = _BANNER.search(proc.stdout + proc.stderr)
    if match is None:
        return None
    number = int(match.group(1))  # major * 10000 + minor * 100 + patch (TensorRT 10 and later)
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def check_trtexec(trtexec: str, sidecar: EngineSidecar | None) -> None:
    """Refuse a trtexec that cannot load the plan: not on PATH, or another TensorRT release."""
    if shutil.which(trtexec) is None:
        raise BackendUnavailableError(
            f"`{trtexec}` not found on PATH: it ships with TensorRT (the tar/deb packages put it in "
            "TensorRT-*/bin or /usr/src/tensorrt/bin; the pip wheels do not include it). Add it to PATH or "
            "pass --trtexec /path/to/trtexec; use --dry-run to print the command"
        )
    if sidecar is None:
        return
    found = trtexec_version(trtexec)
    if found is None:
        log.warning("could not read the TensorRT version of %s; assuming it matches the plan", trtexec)
        return
    built = ".".join(sidecar.tensorrt_version.split(".")[:3])
    problem = version_problem(built, found, sidecar.version_compatible)
    if problem:
        raise ArtifactError(
            f"{trtexec} belongs to TensorRT {found} and cannot load {sidecar.plan_file}: {problem}. Fix: put the "
            f"trtexec of TensorRT {built} first on PATH (or pass --trtexec PATH), or rebuild with `modiff-trt build`"
        )


def _trt_major_for(plan: Path, sidecar: EngineSidecar | None) -> int:
    """TensorRT major version for the flags: the plan's sidecar, else the installed tensorrt, else 10."""
    if sidecar is not None:
        return int(sidecar.tensorrt_version.split(".")[0])
    try:
        import tensorrt

        return int(str(tensorrt.__version__).split(".")[0])
    except ImportError:
        log.warning("no sidecar for %s and no tensorrt installed: assuming TensorRT 10.x flags", plan)
        return 10


def profile_engine(
    export_dir: str | Path,
    engine: str = "step",
    batch: int = 1,
    per_layer: bool = False,
    dry_run: bool = False,
    trtexec: str = "trtexec",
    real_state: bool = True,
    top: int = 15,
    duration_s: float | None = None,
) -> ProfileResult:
    """Benchmark one plan of an export with trtexec; results go to `DIR/profile/<engine>-b<batch>.json`.

    Input files are written under `DIR/profile/inputs-<engine>-b<batch>/` even on a dry run,
    so the printed command can be pasted as is. `real_state` feeds the step engine the state of
    a real warm-up step (ONNX Runtime on the CPU); if that fails, zeros are used.
    """
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir, verify_files=False)
    key = engine if engine in manifest.graphs else ("unet" if "unet" in manifest.graphs else engine)
    if key not in manifest.graphs:
        raise ModiffError(f"{export_dir} has no {engine!r} graph (it has {sorted(manifest.graphs)})")
    graph = manifest.graphs[key]
    plan = plan_path(export_dir, key)
    if not plan.is_file():
        if not dry_run:
            raise ArtifactError(f"{plan} not found: build the engines first with `modiff-trt build {export_dir}`")
        log.warning("%s does not exist yet; the command assumes `modiff-trt build` will create it", plan)
    if batch < 1:
        raise ModiffError(f"--batch must be >= 1, got {batch}")
    if manifest.batch_size is not None and batch != manifest.batch_size:
        fixed = manifest.batch_size
        raise ModiffError(f"{export_dir} was exported for batch {fixed}: use --batch {fixed}")
    side = sidecar_path(plan)
    sidecar = read_sidecar(side) if side.is_file() else None
    if per_layer and sidecar is not None and sidecar.builder.get("profiling_verbosity") != "detailed":
        log.warning(
            "%s was built without --detailed-profile: per-layer times name fused layers only, without "
            "their parameters; rebuild with `modiff-trt build --detailed-profile` for the full detail",
            plan,
        )

    work = export_dir / "profile"
    stem = f"{key}-b{batch}"
    values: dict[str, np.ndarray] = {}
    if real_state and key == "step" and "warmup" in manifest.graphs:
        try:
            values = warmup_state(export_dir, manifest, batch)
        except Exception as exc:  # noqa: BLE001 - zeros are a documented, logged fallback
            log.warning("could not compute a real warm-up state with ONNX Runtime (%s); using zeros", exc)
    if manifest.step_groups is not None:  # the ratios of step 1's group: the step the warm-up state leads to
        values[STEP_SCALE_RATIO] = np.asarray(manifest.step_groups.ratios[0], dtype=np.float32)
    files = write_input_files(graph, batch, work / f"inputs-{stem}", values)
    shapes = {t.name: _batch_shape(t.shape, batch, t.name) for t in graph.inputs}
    profile_json = work / f"{stem}.layers.json"
    command = build_trtexec_command(
        plan,
        _trt_major_for(plan, sidecar),
        shapes,
        load_inputs=files,
        per_layer=per_layer,
        profile_json=profile_json,
        layer_info_json=work / f"{stem}.layerinfo.json",
        trtexec=trtexec,
        duration_s=duration_s,
        version_compatible=bool(sidecar and sidecar.version_compatible),
    )
    result = ProfileResult(command, key, batch)
    if dry_run:
        return result

    check_trtexec(trtexec, sidecar)
    log.info("running %s", " ".join(command))
    proc = subprocess.run(command, capture_output=True, text=True, check=False)  # list args, no shell
    output = proc.stdout + proc.stderr
    result.log_path = atomic_write(work / f"{stem}.log", output)
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-20:])
        raise ModiffError(f"trtexec failed (exit {proc.returncode}); full log in {result.log_path}:\n{tail}")
    result.summary = parse_performance_summary(output)
    if per_layer:
        result.layers = summarize_layer_profile(profile_json, top=top)
    result.json_path = atomic_write(work / f"{stem}.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result


__all__ = [
    "LayerProfileSummary",
    "LayerTime",
    "PerformanceSummary",
    "ProfileResult",
    "TimingStats",
    "build_trtexec_command",
    "check_trtexec",
    "load_inputs_spec",
    "parse_performance_summary",
    "profile_engine",
    "shape_spec",
    "summarize_layer_profile",
    "trtexec_version",
    "warmup_state",
    "write_input_files",
]
