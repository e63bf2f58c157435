"""Writing samples: one PNG per image, a grid PNG and `samples.npz` (`arr_0` uint8 NHWC, `x0`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modiff_trt.atomic import atomic_file


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> uint8 NHWC, the layout the guided-diffusion evaluator reads."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile NHWC uint8 images into one HWC image with `pad` black pixels between tiles."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    return grid


def _pil(image: np.ndarray, upscale: int = 1) -> Image.Image:
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    return pil


def save_image(image: np.ndarray, path: Path, upscale: int = 1) -> None:
    """Save one HWC uint8 image as PNG via a temp file, so a crash leaves no broken PNG."""
    with atomic_file(path) as tmp:
        _pil(image, upscale).save(tmp, format="PNG")


def save_samples(x0: torch.Tensor, out: Path, first_index: int = 0, pngs: bool = True) -> np.ndarray:
    """Write `out/NNNNNN.png` for each image and return the uint8 images."""
    out.mkdir(parents=True, exist_ok=True)
    images = to_uint8(x0)
    if pngs:
        for i, image in enumerate(images):
            save_image(image, out / f"{first_index + i:06d}.png")
    return images


def save_npz(images: np.ndarray, x0: torch.Tensor, path: Path, **extra: np.ndarray) -> None:
    """`arr_0` (uint8 NHWC) and `x0` (float32 NCHW), plus `extra` arrays (LDMs: `z0` latents), atomically."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, arr_0=images, x0=x0.detach().float().cpu().numpy(), **extra)
