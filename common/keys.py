"""The vocabulary of configuration keys: what a key is, how a value is read and checked.

A leaf module (it imports nothing from the project), so that each layer can declare its own keys with it:
``models/config.py`` the model's, ``data/registry.py`` and each dataset's spec the data's, and
``utils/config.py`` the training run's, which it then assembles into the one schema of flags and YAML.
"""

import math
from dataclasses import dataclass

import yaml

from common.cli import shown

NATIVE_SIZE = -1  # img_size of "the images as they are" in configs (YAML, checkpoints)


@dataclass(frozen=True)
class Interval:
    """The accepted range of a number; an open end excludes its bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # why the range is what it is, for the message

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, kind) -> str:
        if kind is int and self.high is None and self.low == 1 and not self.low_open:
            return "a positive integer"
        noun = "an integer" if kind is int else "a finite number"
        number = (lambda x: f"{int(x)}") if kind is int else (lambda x: f"{x:g}")
        if self.high is None:
            return f"{noun} {'>' if self.low_open else '>='} {number(self.low)}"
        low, high = number(self.low), number(self.high)
        text = f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return text + (f" ({self.note})" if self.note else "")


POSITIVE = Interval(1)
NON_NEGATIVE = Interval(0)
ABOVE_ZERO = Interval(0, low_open=True)


@dataclass(frozen=True)
class Key:
    name: str
    section: str  # 'model', 'data' or 'train'
    default: object
    kind: object  # bool, int, float, str, 'size', 'intlist' or 'mapping'
    help: str
    choices: object = None  # a tuple, or a callable returning the names of a registry
    interval: Interval | None = None
    optional: bool = False  # None is a value of its own (e.g. num_train None: every sample)
    execution: bool = False  # how the model runs, not what it computes: may differ on resume and load
    snn_only: bool = False  # means nothing to an ANN
    derived: bool = False  # follows from the dataset; never set by hand

    def allowed(self):
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def default_value(self):
        """A fresh copy of the default (lists and dicts are not shared between configs)."""
        value = self.default
        return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def key_table(*groups) -> dict:
    """{name: Key} of the given keys (iterables of Key); a name declared twice is a programming error."""
    table = {}
    for key in (k for group in groups for k in group):
        if table.get(key.name, key) is not key:
            raise ValueError(f"config key {key.name!r} is declared twice")
        table[key.name] = key
    return table


# ----------------------------------------------------------------------------- reading values
def str2bool(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false/1/0), got {shown(text)}")


def parse_mapping(text) -> dict:
    if isinstance(text, dict):
        return dict(text)
    try:
        value = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping such as '{{gamma: 0.3}}', got {shown(text)}")
    return value


def parse_size(value):
    """The one reader of image sizes: int, [s], [h, w] (or strings of them) -> [h, w]; None, -1 or [-1]
    -> None, the native size. Anything else (0, other negatives, three numbers) is an error."""
    if value is None:
        return None
    sizes = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        sizes = [_to_int(s) for s in sizes]
    except ValueError:
        sizes = None
    if sizes == [NATIVE_SIZE]:
        return None
    if not sizes or len(sizes) > 2 or min(sizes) < 1:
        given = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        raise ValueError(
            f"img_size must be one positive int (square), two (H W), or -1 for the native size, "
            f"got {shown(given, quote=False)}"
        )
    return sizes * 2 if len(sizes) == 1 else sizes  # one number: a square


def _to_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {shown(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {shown(value)}")
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {shown(value)}") from None


def _to_float(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {shown(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {shown(value)}") from None


def _to_str(value) -> str:
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"expected a single value, got {shown(value)}")
    return str(value)


_CONVERTERS = {
    bool: str2bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    "mapping": parse_mapping,
    "size": lambda v: parse_size(v) or NATIVE_SIZE,
    "intlist": lambda v: [_to_int(x) for x in (v if isinstance(v, (list, tuple)) else [v])],
}


def coerce(key: Key, value):
    """A value from a flag, a YAML file or a checkpoint as the key's type (YAML reads 1e-3 as a string)."""
    if value is None and (key.optional or key.kind == "size"):
        return None if key.optional else NATIVE_SIZE
    if value is None:
        raise ValueError("needs a value, got null")
    return _CONVERTERS[key.kind](value)


def check_value(key: Key, value):
    """ValueError naming the key and what it accepts, if ``value`` (already coerced) is not allowed."""
    if value is None and key.optional:
        return
    if key.choices is not None and value not in key.allowed():
        raise ValueError(f"unknown {key.name} {shown(value)}; choices: {', '.join(map(str, key.allowed()))}")
    if key.kind in (int, float) and (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or (key.interval and value not in key.interval)
    ):
        rule = key.interval.describe(key.kind) if key.interval else "a finite number"
        raise ValueError(f"{key.name!r} must be {rule}, got {shown(value)}")
    if key.kind == "size" and value != NATIVE_SIZE:
        parse_size(value)
