"""Sampling many images in batches with per-image noise and a progress bar, and writing them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from modiff_trt.sampling.conditioning import ContextSource
from modiff_trt.sampling.distributed import SINGLE_PROCESS, World, run_batches
from modiff_trt.sampling.noise import image_noise
from modiff_trt.sampling.sampler import Sampler
from modiff_trt.sampling.writer import sample_writer

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
    world: World = SINGLE_PROCESS,
) -> torch.Tensor | None:
    """Final samples [num_images, *sample_shape] of `sampler` on `model`, batch by batch, on the CPU.

    Image i's noise (and context, and eta noise) depends only on (seed, i), so any batch size
    gives the same images. Every caller (sample, calibrate, the demo) goes through this one loop.
    In a distributed run (`world`, see `distributed`) this process runs its share of the batches
    and only rank 0 sees results. With `on_batch`, rank 0's `on_batch(first_index, x0)` gets every
    batch of the run in order and nothing is kept (None is returned, so a large run never sits in
    memory); without it the samples are returned, concatenated (single-process runs only).
    """
    if on_batch is None and world.distributed:
        raise ValueError("a distributed run hands its samples to rank 0 batch by batch: pass on_batch")
    device = model_device(model)
    steps = len(sampler.timesteps())
    outputs: list[torch.Tensor] = []
    own = sum(min(batch_size, num_images - start) for start in world.batch_starts(num_images, batch_size))
    description = description or f"sampling ({sampler.name})"
    with progress_bar(disable=not (progress and world.main)) as bar:
        task = bar.add_task(
            f"{description} (rank 0 of {world.size})" if world.distributed else description, total=own * steps
        )

        def run(indices: list[int]) -> torch.Tensor:
            noise = image_noise(seed, indices, sample_shape).to(device)
            return (
                sampler.trajectory(
                    model,
                    noise,
                    indices,
                    seed=seed,
                    conditioning=conditioning,
                    callback=lambda *_: bar.advance(task, len(indices)),
                )
                .float()
                .cpu()
            )

        run_batches(world, num_images, batch_size, run, on_batch or (lambda _, x0: outputs.append(x0)))
    return torch.cat(outputs) if outputs else None


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
    world: World = SINGLE_PROCESS,
) -> Path | None:
    """Sample and write `out/NNNNNN.png`, `out/grid.png`, `out/samples.npz`; return the npz path.

    With a `decoder` (latent diffusion) each batch of latents is decoded into images as it
    arrives and `samples.npz` adds `z0` (the float32 latents). Batches stream to disk
    (`SampleWriter`), so memory does not grow with `num_images`. In a distributed run every rank
    samples its share and rank 0 alone decodes and writes (the other ranks return None).
    """
    grid_images = 64 if decoder is not None else 256  # decoded images are large: a smaller grid

    def write(start: int, batch: torch.Tensor) -> None:
        if decoder is None:
            writer.add(start, batch)
        else:
            writer.add(start, decode_latents(decoder, batch), z0=batch)

    with sample_writer(out, num_images, pngs, grid_images) if world.main else contextlib.nullcontext() as writer:
        sample_batches(
            sampler,
            runner,
            sample_shape,
            num_images,
            batch_size,
            seed,
            conditioning,
            on_batch=write if writer else lambda *_: None,
            progress=progress,
            world=world,
        )
        if writer is None:
            return None
        if decoder is not None:
            log.info("decoded %d latents %s into images", num_images, tuple(sample_shape))
        return writer.finish()
