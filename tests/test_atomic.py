"""The one atomic-write helper: the old file or the new one, never half, and no temp file left."""

from __future__ import annotations

import stat

import numpy as np
import pytest

from modiff_trt.atomic import atomic_directory, atomic_file, atomic_write, replace_any
from modiff_trt.errors import ArtifactError


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "plan.json"
    atomic_write(path, "old\n")
    atomic_write(path, b"new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert path.stat().st_mode & stat.S_IROTH  # shipped weights must be readable by everyone


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_temp_name_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    path = tmp_path / "samples.npz"
    with atomic_file(path) as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        np.savez(tmp, arr_0=np.arange(3))
    assert np.load(path)["arr_0"].tolist() == [0, 1, 2]


def test_directory_swap_refuses_unrelated_folders(tmp_path):
    out = tmp_path / "export"
    with atomic_directory(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
    with atomic_directory(out, replace_any) as tmp:
        (tmp / "manifest.json").write_text('{"v": 2}')
    assert (out / "manifest.json").read_text() == '{"v": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="photos is not empty: pass --overwrite"):
        with atomic_directory(tmp_path / "photos"):
            pass
    assert (tmp_path / "photos" / "a.jpg").read_bytes() == b"x"


def test_directory_swap_leaves_the_old_directory_on_error(tmp_path):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "old.png").write_bytes(b"old")
    with pytest.raises(ArtifactError, match=f"{out}: no space left on the device .* free space"):
        with atomic_directory(out, replace_any) as tmp:
            (tmp / "new.png").write_bytes(b"new")
            with atomic_file(tmp / "samples.npz"):  # named after the directory, not its temporary file
                raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]
    assert sorted(p.name for p in out.iterdir()) == ["old.png"]
    with pytest.raises(PermissionError), atomic_directory(out, replace_any):
        raise PermissionError(13, "other errors pass unchanged")
