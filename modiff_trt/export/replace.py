"""When `export --out` may replace an existing directory: only a complete earlier export.

The directory must hold a manifest whose graphs exist and hash right, and nothing but the
files modiff-trt writes there (graphs, their external data, the copy of the calibration,
TensorRT plans with sidecars, the `profile/` folder of `modiff-trt profile`). Anything else (a user's notes, a stray file) makes
the export refuse, so files the tool did not write are never deleted. Plans built from the old
graphs go with them, and the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from modiff_trt.errors import ArtifactError
from modiff_trt.export.manifest import CALIBRATION_COPY, MANIFEST_NAME, load_manifest

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"


def export_files(out: Path) -> set[str]:
    """Names modiff-trt writes into the export `out` (whose manifest must be valid)."""
    manifest = load_manifest(out)
    names = {MANIFEST_NAME, PROFILE_DIR, CALIBRATION_COPY}
    for key, graph in manifest.graphs.items():
        names |= {graph.file, f"{graph.file}.data", f"{key}.plan", f"{key}.plan.json"}
    return names


def check_replaceable_export(out: Path) -> None:
    """Raise unless `out` is a complete earlier export holding only files modiff-trt wrote."""
    try:
        ours = export_files(out)
    except ArtifactError as exc:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ArtifactError(
            f"--out {out} is not empty and not a complete earlier export (it holds {held}): choose another --out"
        ) from exc
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        raise ArtifactError(
            f"--out {out} holds files modiff-trt did not write ({', '.join(foreign[:5])}): "
            "move them away or choose another --out"
        )
    plans = sorted(p.name for p in out.glob("*.plan"))
    if plans:
        log.warning(
            "replacing the export in %s also removes the engines built from its graphs: %s", out, ", ".join(plans)
        )
