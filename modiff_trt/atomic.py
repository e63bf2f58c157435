"""Writing files and directories so that a crash or Ctrl-C leaves the old one or none, never half.

Every artifact the package writes (plans, sidecars, calibration files, weights, images, export
directories) goes through here: written under a temporary name in the destination's folder (so
the final rename stays on one file system and is atomic), then renamed over the destination.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from modiff_trt.errors import ArtifactError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class _NoSpaceError(ArtifactError):
    """The disk or quota filled up while writing an artifact."""


@contextlib.contextmanager
def _full_disk_named(path: Path) -> Iterator[None]:
    """A full disk or quota becomes one line naming what was being written (the caller removes the rest).

    Raised from a file inside a directory being written, it is renamed after that directory:
    the temporary name of the file means nothing to the user.
    """
    try:
        yield
    except (OSError, _NoSpaceError) as exc:
        if isinstance(exc, OSError) and exc.errno not in NO_SPACE:
            raise
        cause = exc.__cause__ if isinstance(exc, _NoSpaceError) else exc
        earlier = ", the earlier one is untouched" if path.exists() else ""
        raise _NoSpaceError(
            f"{path}: no space left on the device while writing it, so nothing was kept{earlier}: "
            "free space or write somewhere else"
        ) from cause


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path`.

    The temporary name keeps `path`'s suffix, so writers that infer the format from it (PIL,
    numpy's savez) behave as with the real name. On error the partial file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _full_disk_named(path):
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


def writable_parent(path: Path, option: str) -> None:
    """Refuse `path` when the nearest existing folder above it cannot be written (or is a file)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"{option} {path}: {parent} is not a writable directory; choose another {option}")


def writable_file(path: Path | None, option: str, overwrite: bool = True) -> Path | None:
    """A file the command will write: its folder writable, not a directory, kept unless `overwrite`."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{option} {path} is a directory: name a file")
    if path.exists():
        if not overwrite:
            raise ArtifactError(f"{option} {path} exists: pass --overwrite to replace it, or choose another {option}")
        if not os.access(path, os.W_OK):
            raise ArtifactError(f"{option} {path} is read-only: choose another {option}")
    writable_parent(path, option)
    return path


ReplaceCheck = Callable[[Path], None]


def refuse_non_empty(out: Path) -> None:
    """The default policy: a directory that already holds files is never replaced."""
    raise ArtifactError(f"{out} is not empty: pass --overwrite to replace it, or choose another --out")


def replace_any(out: Path) -> None:
    """The --overwrite policy: the user asked for `out` to be replaced as a whole."""


def check_destination(out: str | Path, may_replace: ReplaceCheck = refuse_non_empty) -> Path:
    """Refuse `out` before any work: a file, a non-empty folder `may_replace` rejects, or no write access.

    Commands call it before loading a model, so a bad --out costs nothing; `atomic_directory`
    calls it again in case the folder changed meanwhile.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} is a file, not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        may_replace(out)
    writable_parent(out, "--out")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | Path, may_replace: ReplaceCheck = refuse_non_empty) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out`, on error it vanishes.

    An existing non-empty `out` is first passed to `may_replace`, which raises when it may not
    be replaced (the default refuses), so a typo in --out cannot wipe an unrelated folder. The
    temp directory is created before the caller computes anything: an unwritable destination
    fails at once, and a crash, Ctrl-C or full disk leaves the old `out` untouched.
    """
    out = check_destination(out, may_replace)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ArtifactError(f"cannot write {out} ({exc.strerror}): choose another --out") from exc
    try:
        with _full_disk_named(out):
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
