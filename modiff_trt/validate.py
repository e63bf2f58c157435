"""Checks every command runs on its options before any compute is spent (output paths: `atomic`).

They raise `OptionError`/`ArtifactError` naming the CLI flag, so a library caller and a CLI
user get the same one-line refusal; nothing here touches a model.
"""

from __future__ import annotations

import math

from modiff_trt.errors import OptionError


def at_least(option: str, value: int | None, minimum: int) -> int | None:
    """`value` (None passes: it means the default), refused below `minimum`."""
    if value is not None and value < minimum:
        raise OptionError(f"{option} {value} is invalid: it must be >= {minimum}")
    return value


def finite_eta(eta: float | None, option: str = "--eta") -> float | None:
    """DDIM eta: finite and >= 0 (above 1 is allowed but adds more noise than DDPM)."""
    if eta is not None and (not math.isfinite(eta) or eta < 0):
        raise OptionError(f"{option} {eta} is invalid: it must be a finite number >= 0 (0 is deterministic DDIM)")
    return eta


def sample_counts(num_images: int, batch_size: int | None, seed: int) -> None:
    """The counts every sampling command takes: -n >= 1, --batch-size >= 1, --seed >= 0."""
    at_least("--num-images", num_images, 1)
    at_least("--batch-size", batch_size, 1)
    at_least("--seed", seed, 0)
