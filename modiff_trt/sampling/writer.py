"""Writing a run's samples batch by batch, without holding the run in memory.

`SampleWriter` takes batches in any order as they finish (from this process or, in a
distributed run, gathered from every rank) and writes `NNNNNN.png` for each image at once. The
arrays of `samples.npz` go row by row into memory-mapped `.npy` files beside it; `finish()`
stores them into the `.npz` zip (uncompressed, as `np.savez` does, so `np.load` reads it the
same way) and writes `grid.png` from the first images. So memory stays at one batch plus the
grid's images, whatever the number of samples. Until `finish()` the npz and grid do not
exist, and on error the temporary `.npy` files are removed: an interrupted run leaves only
complete PNGs.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from modiff_trt.atomic import atomic_file
from modiff_trt.errors import OptionError
from modiff_trt.sampling.images import make_grid, save_image, save_samples


class SampleWriter:
    """PNGs, `grid.png` and `samples.npz` (`arr_0` uint8 NHWC, `x0` float32 NCHW, plus extras) of `num_images`."""

    def __init__(self, out: Path, num_images: int, pngs: bool = True, grid_images: int = 256) -> None:
        self.out = Path(out)
        self.num_images = num_images
        self.pngs = pngs
        self.grid_images = grid_images
        self._arrays: dict[str, np.memmap] = {}
        self._grid: dict[int, np.ndarray] = {}
        self._written = 0
        self.out.mkdir(parents=True, exist_ok=True)

    def _column(self, name: str, rows: np.ndarray) -> np.memmap:
        if name not in self._arrays:
            path = self.out / f".{name}.tmp-{os.getpid()}.npy"
            shape = (self.num_images, *rows.shape[1:])
            self._arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=rows.dtype, shape=shape)
        return self._arrays[name]

    def add(self, first_index: int, x0: torch.Tensor, **extra: torch.Tensor) -> None:
        """Images `first_index ..` ([-1, 1] NCHW) and per-image `extra` arrays (LDMs: `z0` latents)."""
        images = save_samples(x0, self.out, first_index=first_index, pngs=self.pngs)
        columns = {"arr_0": images, "x0": x0.detach().float().cpu().numpy()}
        columns.update({name: value.detach().float().cpu().numpy() for name, value in extra.items()})
        for name, rows in columns.items():
            self._column(name, rows)[first_index : first_index + len(rows)] = rows
        for i, image in enumerate(images[: max(0, self.grid_images - first_index)]):
            self._grid[first_index + i] = image
        self._written += len(images)

    def finish(self, grid_upscale_to: int = 128) -> Path:
        """Write `grid.png` and `samples.npz` once every image arrived; returns the npz path."""
        if self._written != self.num_images:
            raise RuntimeError(f"{self._written} of {self.num_images} samples were written")
        grid = np.stack([self._grid[i] for i in sorted(self._grid)])
        save_image(make_grid(grid), self.out / "grid.png", upscale=max(1, grid_upscale_to // grid.shape[1]))
        path = self.out / "samples.npz"
        with atomic_file(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in self._arrays.items():
                array.flush()
                archive.write(array.filename, arcname=f"{name}.npy")
        return path

    def close(self) -> None:
        """Remove the temporary `.npy` files (after `finish`, or after an error)."""
        paths = [Path(array.filename) for array in self._arrays.values()]
        self._arrays.clear()
        for path in paths:
            path.unlink(missing_ok=True)


def bytes_at_least(num_images: int, sample_shape: tuple[int, ...] | list[int]) -> int:
    """A lower bound of the disk a run writes: samples.npz's uint8 and float32 columns, twice.

    Twice because the rows go to memory-mapped .npy files first and are then copied into the npz.
    PNGs, latent models' decoded images (larger than their latents) and the grid come on top.
    """
    return 2 * (1 + 4) * num_images * math.prod(sample_shape)


def check_disk_room(out: Path, num_images: int, sample_shape: tuple[int, ...] | list[int]) -> None:
    """Refuse a run whose arrays cannot fit on `out`'s disk, before the first batch instead of at the end."""
    folder = Path(out).absolute()
    while not folder.exists():
        folder = folder.parent
    needed, free = bytes_at_least(num_images, sample_shape), shutil.disk_usage(folder).free
    if needed > free:
        raise OptionError(
            f"-n {num_images} needs at least {needed / 2**30:,.1f} GiB for samples.npz under {folder}, "
            f"which has {free / 2**30:,.1f} GiB free: lower -n, or choose an --out on a larger disk"
        )


@contextlib.contextmanager
def sample_writer(out: Path, num_images: int, pngs: bool = True, grid_images: int = 256) -> Iterator[SampleWriter]:
    """A `SampleWriter` whose temporary files are gone when the block ends, however it ends."""
    writer = SampleWriter(out, num_images, pngs, grid_images)
    try:
        yield writer
    finally:
        writer.close()
