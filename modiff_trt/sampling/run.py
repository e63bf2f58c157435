"""Sampling many images in batches with per-image noise and a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from modiff_trt.sampling.ddim import ddim_sample
from modiff_trt.sampling.images import make_grid, save_image, save_npz, save_samples, to_uint8
from modiff_trt.sampling.noise import image_noise, step_generators

BatchCallback = Callable[[int, torch.Tensor], None]


def progress_bar(disable: bool = False) -> Progress:
    """The rich progress bar used by every long-running command (to stderr)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=disable,
        transient=False,
    )


BatchTrajectory = Callable[[torch.Tensor, list[int], Callable[..., None]], torch.Tensor]


def sample_batches(
    trajectory: BatchTrajectory,
    sample_shape: Sequence[int],
    num_images: int,
    batch_size: int,
    steps: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_batch: BatchCallback | None = None,
    progress: bool = True,
    description: str = "sampling",
) -> torch.Tensor:
    """Final samples of `trajectory(noise, indices, advance)` batch by batch, on the CPU.

    Image i's noise depends only on (seed, i); `advance` moves the progress bar by one step of
    the batch. Every sampler (DDIM, LDM DDIM/PLMS) goes through this one loop.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be >= 1")
    outputs = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=num_images * steps)
        for start in range(0, num_images, batch_size):
            indices = list(range(start, min(start + batch_size, num_images)))
            noise = image_noise(seed, indices, sample_shape).to(device)
            x0 = trajectory(noise, indices, lambda *_, n=len(indices): bar.advance(task, n)).float().cpu()
            if on_batch is not None:
                on_batch(start, x0)
            outputs.append(x0)
    return torch.cat(outputs)


def sample_images(
    runner: Callable[..., torch.Tensor],
    sample_shape: Sequence[int],
    num_images: int,
    batch_size: int,
    timesteps: Sequence[int],
    betas: torch.Tensor,
    eta: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_batch: BatchCallback | None = None,
    progress: bool = True,
    description: str = "sampling",
) -> torch.Tensor:
    """DDIM final samples [num_images, *sample_shape] on the CPU; image i depends only on (seed, i)."""

    def trajectory(noise: torch.Tensor, indices: list[int], advance: Callable[..., None]) -> torch.Tensor:
        generator = step_generators(seed, indices) if eta > 0 else None
        return ddim_sample(runner, noise, timesteps, betas, eta=eta, generator=generator, callback=advance)

    return sample_batches(trajectory, sample_shape, num_images, batch_size, len(timesteps), seed, device,
                          on_batch, progress, description)


def write_samples(
    runner: Callable[..., torch.Tensor],
    sample_shape: Sequence[int],
    betas: torch.Tensor,
    out: Path,
    num_images: int,
    batch_size: int,
    timesteps: Sequence[int],
    eta: float = 0.0,
    seed: int = 0,
    pngs: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Sample and write `out/NNNNNN.png`, `out/grid.png`, `out/samples.npz`; return x0."""
    out.mkdir(parents=True, exist_ok=True)
    device = getattr(runner, "device", torch.device("cpu"))
    x0 = sample_images(
        runner, sample_shape, num_images, batch_size, timesteps, betas, eta=eta, seed=seed, device=device,
        on_batch=lambda start, batch: save_samples(batch, out, first_index=start, pngs=pngs), progress=progress,
    )
    images = to_uint8(x0)
    save_image(make_grid(images[:256]), out / "grid.png", upscale=max(1, 128 // images.shape[1]))
    save_npz(images, x0, out / "samples.npz")
    return x0
