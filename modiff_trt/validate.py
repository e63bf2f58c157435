"""Checks every command runs on its options and config fields before any compute is spent (output paths: `atomic`).

They raise `OptionError` naming the CLI flag, or `ConfigError` naming the file and field, so a
library caller and a CLI user get the same one-line refusal; nothing here touches a model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Sequence
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


_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", type(None): "null"}
_PLURAL_NAMES = {int: "integers", float: "finite numbers", str: "strings", bool: "true or false values"}


def _plural(hint: Any) -> str:
    """What a list of `hint` holds, for messages: 'integers', 'integers or strings', 'lists of numbers'."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return " or ".join(_plural(arg) for arg in args if arg is not type(None))
    if origin in (tuple, list):
        return f"lists of {_plural(args[0])}"
    if origin is Literal:
        return "values among " + ", ".join(map(json.dumps, args))
    if dataclasses.is_dataclass(hint) or origin is dict:
        return "objects"
    return _PLURAL_NAMES.get(hint, hint.__name__)


def _expected_type(value: Any, hint: Any) -> str | None:
    """What a JSON `value` should be when it does not fit the annotation `hint`, else None.

    JSON has no tuples, so a `tuple[X, ...]` field takes a list; bools are not integers here
    (`true` as a batch size is an edited file, not a 1), and a float must be finite (JSON's NaN
    and Infinity are no scale, eta or timing). A nested dataclass takes an object, whose own
    fields `dataclass_value` checks.
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return None if value in args and not isinstance(value, bool) else "one of " + ", ".join(map(json.dumps, args))
    if origin in (Union, UnionType):
        wrong = [_expected_type(value, arg) for arg in args]
        return None if None in wrong else " or ".join(w for w in wrong if w)
    if origin in (tuple, list):
        fits = isinstance(value, list) and not any(_expected_type(item, args[0]) for item in value)
        return None if fits else f"a list of {_plural(args[0])}"
    if dataclasses.is_dataclass(hint) or origin is dict or hint is dict:
        return None if isinstance(value, dict) else "an object"
    if hint is Any:
        return None
    if hint is type(None):
        return None if value is None else "null"
    numeric = (int, float) if hint is float else (hint,)
    fits = isinstance(value, numeric) and (hint is bool or not isinstance(value, bool))
    if fits and hint is float and not math.isfinite(value):
        fits = False
    return None if fits else _TYPE_NAMES.get(hint, hint.__name__)


def wrong_type(where: str, value: Any, hint: Any) -> str | None:
    """`'<where> is <value as JSON>; it must be <what hint takes>'` when `value` does not fit `hint`, else None."""
    expected = _expected_type(value, hint)
    return None if expected is None else f"{where} is {_show(value)}; it must be {expected}"


def _show(value: Any) -> str:
    """A value as the JSON file holds it, cut short so a 1000-element list stays one readable line."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


#: Field checks beyond the type, as `field(metadata={"check": ...})`: a function of the (typed)
#: JSON value returning what the value must be when it is out of range, else None.
Check = Callable[[Any], "str | None"]


def _numbers(value: Any, fits: Callable[[Any], bool], what: str) -> str | None:
    """`what` ('>= 0') as a requirement on a number, or on every number of a (nested) list; null passes."""
    if all(fits(v) for v in _flatten(value)):
        return None
    return f"made of numbers {what}" if isinstance(value, (list, tuple)) else f"a number {what}"


def at_least_value(minimum: float) -> Check:
    """A number >= `minimum`, or a (nested) list of them."""
    return lambda value: _numbers(value, lambda v: v >= minimum, f">= {minimum:g}")


def within(low: float, high: float) -> Check:
    """A number in `low..high`, or a (nested) list of them."""
    return lambda value: _numbers(value, lambda v: low <= v <= high, f"within {low:g}..{high:g}")


def positive_values(value: Any) -> str | None:
    """A number > 0, or a (nested) list of them: sizes, scales, dims."""
    return _numbers(value, lambda v: v > 0, "> 0")


def non_empty(value: Any) -> str | None:
    return None if value is None or value != "" else "a non-empty string"


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(value: Any) -> str | None:
    """A sha256 as `hashlib.hexdigest` writes it (null passes: nothing was hashed)."""
    return None if value is None or SHA256.match(value) else "64 lowercase hex digits (a sha256)"


def plain_file_name(value: Any) -> str | None:
    """A file name inside its directory: no folder separator, no `..`, not absolute.

    What the manifest names is joined to the export directory; anything else would make a
    command read, hash or run a file outside it.
    """
    bad = value in ("", ".", "..") or "/" in value or "\\" in value or Path(value).is_absolute() or ":" in value
    return "a plain file name inside the export directory (no folder, no '..')" if bad else None


def numpy_dtype(value: Any) -> str | None:
    import numpy as np

    try:
        fits = np.dtype(value).name == value
    except TypeError:
        fits = False
    return None if fits else "a numpy dtype name such as float32"


def _flatten(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _flatten(v)]
    return [value]


def field_problem(where: str, value: Any, hint: Any, check: Check | None = None) -> str | None:
    """Why `value` cannot be field `where` (wrong type, or out of `check`'s range), else None."""
    wrong = wrong_type(where, value, hint)
    if wrong is None and check is not None:
        expected = check(value)
        wrong = None if expected is None else f"{where} is {_show(value)}; it must be {expected}"
    return wrong


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (itself, or the non-null member of `X | None`), else None."""
    if get_origin(hint) in (Union, UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        hint = members[0] if len(members) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _convert(value: Any, hint: Any, where: str, error: type[ModiffError], fix: str) -> Any:
    """A typed JSON value as the field holds it: nested objects as their dataclass, lists as
    tuples where the annotation says tuple."""
    if value is None:
        return None
    if get_origin(hint) is dict and _dataclass_of(get_args(hint)[1]) is not None:
        return {k: _convert(v, get_args(hint)[1], f"{where}.{k}", error, fix) for k, v in value.items()}
    nested = _dataclass_of(hint)
    if nested is not None:
        return dataclass_value(nested, value, where, error, fix)
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        origin = get_origin(members[0]) if len(members) == 1 else None
        hint = members[0]
    if origin in (tuple, list) and isinstance(value, list):
        item = get_args(hint)[0]
        items = [_convert(v, item, f"{where}[{i}]", error, fix) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


def dataclass_fields(cls: type, data: Any, where: str, error: type[ModiffError], fix: str = "") -> dict[str, Any]:
    """The constructor arguments of dataclass `cls` out of a parsed JSON object, every field present and typed.

    A field's JSON key is its `metadata["key"]` or its name; `metadata["check"]` (a `Check`)
    bounds its value; nested dataclasses (also in lists) are built the same way, and tuple
    fields take JSON lists. Raises `error` naming `where.<key>` (`where.<key>[i].<key>` inside
    lists), then `fix`, for a missing, unknown, wrong-typed or out-of-range field: no field
    falls back to its default, so a removed field is never silently replaced.
    """
    if not isinstance(data, dict):
        raise error(f"{where} is {_show(data)}, not an object{fix}")
    hints = _type_hints(cls)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"{child(where, unknown[0])} is not a known field{fix}")
    kwargs = {}
    for key, f in fields.items():
        at = child(where, key)
        if key not in data:
            raise error(f"{at} is missing{fix}")
        parse = f.metadata.get("parse")
        if parse is not None:  # a field with its own reader (a polymorphic section)
            kwargs[f.name] = _parsed(parse, data[key], at, error, fix)
            continue
        wrong = field_problem(at, data[key], hints[f.name], f.metadata.get("check"))
        if wrong:
            raise error(wrong + fix)
        kwargs[f.name] = _convert(data[key], hints[f.name], at, error, fix)
    return kwargs


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """`get_type_hints`, once per class: a manifest builds hundreds of layer and tensor specs."""
    return get_type_hints(cls)


def child(where: str, key: str) -> str:
    """The name of field `key` inside `where`: `model.ema`, or `FILE: model` at a file's top level
    (`where` ending in ': ')."""
    return f"{where}{key}" if where.endswith(": ") else f"{where}.{key}"


def _parsed(parse: Callable[[Any, str], Any], value: Any, where: str, error: type[ModiffError], fix: str) -> Any:
    try:
        return parse(value, where)
    except ModiffError as exc:
        raise error(f"{exc}{fix}") from exc


def dataclass_value(cls: type, data: Any, where: str, error: type[ModiffError], fix: str = "") -> Any:
    """`cls` built from a parsed JSON object, every field checked as `dataclass_fields` does.

    A value the class itself refuses (`__post_init__`'s ConfigError: bits against a format, a
    beta schedule) becomes `error` naming `where` too.
    """
    kwargs = dataclass_fields(cls, data, where, error, fix)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise error(f"{where.removesuffix(': ')}: {exc}{fix}") from exc
