"""Writing files and directories so that a crash or Ctrl-C leaves the old one or none, never half.

Every artifact the package writes (plans, sidecars, calibration files, weights, images, export
directories) goes through here: written under a temporary name in the destination's folder (so
the final rename stays on one file system and is atomic), then renamed over the destination.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from modiff_trt.errors import ArtifactError


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path`.

    The temporary name keeps `path`'s suffix, so writers that infer the format from it (PIL,
    numpy's savez) behave as with the real name. On error the partial file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (str: UTF-8) to `path` atomically, fsynced before the rename; returns `path`."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


@contextlib.contextmanager
def atomic_directory(out: Path, marker: str, kind: str) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out`, on error it vanishes.

    An existing non-empty `out` is replaced only when it holds the file `marker` (it is an
    earlier `kind`), so a typo in --out cannot wipe an unrelated folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise ArtifactError(f"{out} exists and is not {kind}: choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
