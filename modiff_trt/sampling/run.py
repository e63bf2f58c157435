"""Sampling many images in batches with per-image noise and a progress bar, and writing them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from modiff_trt.sampling.conditioning import ContextSource
from modiff_trt.sampling.images import make_grid, save_image, save_npz, save_samples, to_uint8
from modiff_trt.sampling.noise import image_noise
from modiff_trt.sampling.sampler import Sampler

log = logging.getLogger(__name__)
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


def model_device(model: Callable[..., torch.Tensor]) -> torch.device:
    """Where `model` wants its inputs: a runner's `device`, a module's parameters, else the CPU."""
    device = getattr(model, "device", None)
    if device is None and isinstance(model, torch.nn.Module):
        device = next(model.parameters(), torch.empty(0)).device
    return torch.device(device or "cpu")


def sample_batches(
    sampler: Sampler,
    model: Callable[..., torch.Tensor],
    sample_shape: Sequence[int],
    num_images: int,
    batch_size: int,
    seed: int = 0,
    conditioning: ContextSource | None = None,
    on_batch: BatchCallback | None = None,
    progress: bool = True,
    description: str | None = None,
) -> torch.Tensor:
    """Final samples [num_images, *sample_shape] of `sampler` on `model`, batch by batch, on the CPU.

    Image i's noise (and context, and eta noise) depends only on (seed, i), so any batch size
    gives the same images. `on_batch(first_index, x0)` sees each batch as it finishes. Every
    caller (sample, calibrate, the demo) goes through this one loop.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be >= 1")
    device = model_device(model)
    steps = len(sampler.timesteps())
    outputs = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description or f"sampling ({sampler.name})", total=num_images * steps)
        for start in range(0, num_images, batch_size):
            indices = list(range(start, min(start + batch_size, num_images)))
            noise = image_noise(seed, indices, sample_shape).to(device)
            x0 = sampler.trajectory(model, noise, indices, seed=seed, conditioning=conditioning,
                                    callback=lambda *_, n=len(indices): bar.advance(task, n)).float().cpu()
            if on_batch is not None:
                on_batch(start, x0)
            outputs.append(x0)
    return torch.cat(outputs)


@torch.no_grad()
def decode_latents(decoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float32, CPU) from latents, via `decoder.decode` (scale_factor applied)."""
    parameter = next(decoder.parameters())
    return decoder.decode(latents.to(parameter.device, parameter.dtype)).float().cpu().clamp(-1, 1)


def write_samples(
    runner: Callable[..., torch.Tensor],
    sampler: Sampler,
    sample_shape: Sequence[int],
    out: Path,
    num_images: int,
    batch_size: int,
    seed: int = 0,
    conditioning: ContextSource | None = None,
    decoder: torch.nn.Module | None = None,
    pngs: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample and write `out/NNNNNN.png`, `out/grid.png`, `out/samples.npz`; return (images, latents).

    With a `decoder` (latent diffusion) each batch of latents is decoded into images as it
    finishes and `samples.npz` adds `z0` (the float32 latents); without one, the samples are
    the images and latents is None.
    """
    out.mkdir(parents=True, exist_ok=True)
    images: list[torch.Tensor] = []

    def write(start: int, batch: torch.Tensor) -> None:
        x0 = batch if decoder is None else decode_latents(decoder, batch)
        save_samples(x0, out, first_index=start, pngs=pngs)
        images.append(x0)

    samples = sample_batches(sampler, runner, sample_shape, num_images, batch_size, seed, conditioning,
                             on_batch=write, progress=progress)
    x0 = torch.cat(images)
    uint8 = to_uint8(x0)
    grid = uint8[:64] if decoder is not None else uint8[:256]  # decoded images are large: a smaller grid
    save_image(make_grid(grid), out / "grid.png", upscale=max(1, 128 // uint8.shape[1]))
    latents = None if decoder is None else samples
    save_npz(uint8, x0, out / "samples.npz", **({} if latents is None else {"z0": latents.numpy()}))
    if latents is not None:
        log.info("decoded %d latents %s -> images %s", len(latents), tuple(latents.shape[1:]), tuple(x0.shape[1:]))
    return x0, latents
