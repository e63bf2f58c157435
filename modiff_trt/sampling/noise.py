"""Per-image noise: image i of a run is the same whatever the batch size or batch order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def image_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, image index, stream) through numpy's SeedSequence.

    Stream 0 draws the initial noise, stream 1 the eta noise of later steps.
    """
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Initial noise of shape [len(indices), *shape], float32 on the CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=image_generator(seed, i)) for i in indices])


def step_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per image for the stochastic part of DDIM (eta > 0)."""
    return [image_generator(seed, i, stream=1) for i in indices]
