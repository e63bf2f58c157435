"""Checks every command runs on its options and config fields before any compute is spent (output paths: `atomic`).

They raise `OptionError` naming the CLI flag, or `ConfigError` naming the file and field, so a
library caller and a CLI user get the same one-line refusal; nothing here touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modiff_trt.errors import ConfigError, OptionError


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


def not_a_directory(option: str, path: str | Path | None, what: str) -> None:
    """An input file option that names a folder: say so, instead of 'not found' or a loader's errno."""
    if path is not None and Path(path).is_dir():
        raise OptionError(f"{option} {path} is a directory: name the {what} inside it")


def sample_counts(num_images: int, batch_size: int | None, seed: int) -> None:
    """The counts every sampling command takes: -n >= 1, --batch-size >= 1, --seed >= 0."""
    at_least("--num-images", num_images, 1)
    at_least("--batch-size", batch_size, 1)
    at_least("--seed", seed, 0)


def positive_int(source: str, field: str, value: Any) -> int:
    """A YAML integer field: refused when fractional (32.5 would be truncated), non-numeric or < 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ConfigError(f"{source}: {field} is {value!r}; it must be a positive integer")
    return int(value)


def positive_ints(source: str, field: str, values: Any) -> tuple[int, ...]:
    """A YAML list of positive integers (channel multipliers, attention resolutions)."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"{source}: {field} is {values!r}; it must be a list of positive integers")
    return tuple(positive_int(source, field, value) for value in values)
