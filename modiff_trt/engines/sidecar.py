"""The JSON sidecar next to each TensorRT plan (`step.plan` -> `step.plan.json`).

A serialized engine only runs on the TensorRT version and GPU architecture that built it; a
mismatch surfaces as an opaque deserialization failure or, worse, an engine built from an older
export that silently computes the wrong thing. The sidecar records what the plan was built with
and from (the graph's sha256 and, since version 2, the manifest's: the batch profile and the
state layout follow the manifest), so the runtime can refuse a stale plan up front with a
message that names the fix. Version 1 sidecars still load; they vouch for the graph only.
Pure Python: written by `trt_build`, checked by `trt_runtime`, tested on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modiff_trt.atomic import atomic_write
from modiff_trt.errors import ArtifactError

SIDECAR_SCHEMA = "modiff-trt/engine-sidecar"
SIDECAR_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class EngineSidecar:
    """What one plan was built with and from."""

    engine: str  # warmup | step | unet
    plan_file: str
    onnx_file: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    profile: dict[str, dict[str, list[int]]]  # input -> {"min": [...], "opt": [...], "max": [...]}
    build_seconds: float
    modiff_trt_version: str
    version_compatible: bool = False
    builder: dict[str, Any] = field(default_factory=dict)  # workspace, optimization level, cache
    manifest_sha256: str | None = None  # of manifest.json at build time; None in version 1 sidecars
    schema: str = SIDECAR_SCHEMA
    version: int = SIDECAR_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def sidecar_path(plan: str | Path) -> Path:
    """`DIR/step.plan` -> `DIR/step.plan.json`."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def write_sidecar(sidecar: EngineSidecar, path: str | Path) -> Path:
    """Atomically write the sidecar JSON."""
    return atomic_write(path, sidecar.to_json() + "\n")


def read_sidecar(path: str | Path) -> EngineSidecar:
    """Read a sidecar; missing or malformed -> ArtifactError telling the user to rebuild."""
    path = Path(path)
    fix = f"rebuild the engines with `modiff-trt build {path.parent}`"
    if not path.is_file():
        raise ArtifactError(f"{path} not found: the plan has no sidecar, so it cannot be trusted; {fix}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict) or data.get("schema") != SIDECAR_SCHEMA:
        raise ArtifactError(f"{path} is not a modiff-trt engine sidecar; {fix}")
    if data.get("version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path} has sidecar version {data.get('version')}, this modiff-trt reads {SIDECAR_VERSION}; {fix}"
        )
    try:
        return EngineSidecar(**data)
    except TypeError as exc:
        raise ArtifactError(f"{path} is malformed ({exc}); {fix}") from exc


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return -1


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def version_problem(built: str, running: str, version_compatible: bool) -> str | None:
    """Why a plan built by TensorRT `built` cannot run on TensorRT `running`, or None if it can.

    Plain plans need the exact release. Version-compatible plans run on any later release of
    the same major version and on the next major version (TensorRT documents that
    version-compatible 10.x plans run on 11.x), never on an older release.
    """
    if not version_compatible:
        return None if built == running else f"it was built with TensorRT {built} but TensorRT {running} is running"
    same_major_newer = _major(built) == _major(running) and _version_tuple(running) >= _version_tuple(built)
    if same_major_newer or _major(running) == _major(built) + 1:
        return None
    return (
        f"it was built version-compatible with TensorRT {built}, which runs only on TensorRT "
        f"{_major(built)}.x releases at least as new and on {_major(built) + 1}.x, but TensorRT {running} is running"
    )


def check_sidecar(
    sidecar: EngineSidecar,
    running_trt_version: str,
    gpu_name: str,
    compute_capability: str,
    onnx_sha256: str | None = None,
    source: str = "engine",
    manifest_sha256: str | None = None,
) -> None:
    """Refuse a plan that was not built by this TensorRT, for this GPU, from this export.

    TensorRT version: see `version_problem`. GPU: the compute capability must match (kernels
    are compiled per architecture), and so must the GPU name (tactics are timed on the
    builder's GPU; another model of the same architecture runs, but slower than a plan built for
    it). ONNX: the plan must come from the graph the manifest describes, or it computes a
    different function. Manifest: the plan must come from this manifest.json (an edited one can
    describe other state or batch shapes than the plan binds); version 1 sidecars skip this.
    """
    fix = "rebuild it on this machine with `modiff-trt build DIR`"
    problems: list[str] = []
    version = version_problem(sidecar.tensorrt_version, running_trt_version, sidecar.version_compatible)
    if version:
        problems.append(version)
    if sidecar.compute_capability != compute_capability:
        problems.append(
            f"it was built for compute capability {sidecar.compute_capability} ({sidecar.gpu_name}) but this GPU "
            f"is {compute_capability} ({gpu_name})"
        )
    elif sidecar.gpu_name != gpu_name:
        problems.append(f"it was built and tuned on a {sidecar.gpu_name} but this GPU is a {gpu_name}")
    if onnx_sha256 is not None and sidecar.onnx_sha256 != onnx_sha256:
        problems.append(
            f"it was built from a different {sidecar.onnx_file} (sha256 {sidecar.onnx_sha256[:12]}..., the export "
            f"now has {onnx_sha256[:12]}...)"
        )
    if manifest_sha256 is not None and sidecar.manifest_sha256 not in (None, manifest_sha256):
        problems.append(
            f"it was built from another manifest.json (sha256 {sidecar.manifest_sha256[:12]}..., the export now has "
            f"{manifest_sha256[:12]}...): the manifest was edited or replaced after the build"
        )
    if problems:
        raise ArtifactError(f"{source} ({sidecar.plan_file}) cannot be used: " + "; ".join(problems) + f". Fix: {fix}.")
