"""Checks every command runs on its options and config fields before any compute is spent (output paths: `atomic`).

They raise `OptionError` naming the CLI flag, or `ConfigError` naming the file and field, so a
library caller and a CLI user get the same one-line refusal; nothing here touches a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from modiff_trt.errors import ConfigError, ModiffError, OptionError


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


def positive_seconds(option: str, value: float) -> float:
    """A time limit: finite and > 0 (0 or a negative limit would fail every wait, nan none)."""
    if not math.isfinite(value) or value <= 0:
        raise OptionError(f"{option} {value} is invalid: it must be a finite number of seconds > 0")
    return value


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


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
_PLURAL_NAMES = {int: "integers", float: "numbers", str: "strings"}


def _expected_type(value: Any, hint: Any) -> str | None:
    """What a JSON `value` should be when it does not fit the annotation `hint`, else None.

    JSON has no tuples, so a `tuple[X, ...]` field takes a list; bools are not integers here
    (`true` as a batch size is an edited file, not a 1).
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return None if value in args and not isinstance(value, bool) else "one of " + ", ".join(map(json.dumps, args))
    if origin in (Union, UnionType):
        wrong = [_expected_type(value, arg) for arg in args]
        return None if None in wrong else " or ".join(w for w in wrong if w)
    if origin in (tuple, list):
        fits = isinstance(value, list) and not any(_expected_type(item, args[0]) for item in value)
        return None if fits else f"a list of {_PLURAL_NAMES[args[0]]}"
    if hint is type(None):
        return None if value is None else "null"
    numeric = (int, float) if hint is float else (hint,)
    fits = isinstance(value, numeric) and (hint is bool or not isinstance(value, bool))
    return None if fits else _TYPE_NAMES.get(hint, hint.__name__)


def wrong_type(where: str, value: Any, hint: Any) -> str | None:
    """`'<where> is <value as JSON>; it must be <what hint takes>'` when `value` does not fit `hint`, else None."""
    expected = _expected_type(value, hint)
    return None if expected is None else f"{where} is {json.dumps(value, default=repr)}; it must be {expected}"


def dataclass_fields(cls: type, data: Any, where: str, error: type[ModiffError], fix: str = "") -> dict[str, Any]:
    """The constructor arguments of dataclass `cls` out of a parsed JSON object, every field present and typed.

    A field's JSON key is its `metadata["key"]` or its name; lists become tuples. Raises `error`
    naming `where.<key>`, then `fix`, for a missing, unknown or wrong-typed field.
    """
    if not isinstance(data, dict):
        raise error(f"{where} is {json.dumps(data, default=repr)}, not an object{fix}")
    hints = get_type_hints(cls)
    keys = {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise error(f"{where}.{unknown[0]} is not a known field{fix}")
    kwargs = {}
    for key, name in keys.items():
        if key not in data:
            raise error(f"{where}.{key} is missing{fix}")
        value = data[key]
        wrong = wrong_type(f"{where}.{key}", value, hints[name])
        if wrong:
            raise error(wrong + fix)
        kwargs[name] = tuple(value) if isinstance(value, list) else value
    return kwargs
