"""Value checks shared by every config section's `validate()`: each raises ValueError naming the dotted key,
the value and what was expected (launch.config adds where the value came from)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"config key '{key}' is {value!r}; expected one of {', '.join(map(str, allowed))}.")


def check_positive(key: str, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"config key '{key}' is {value}; expected a positive integer.")


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def check_range(
    key: str, value: Any, low: float, high: float, high_open: bool = False, what: str = "a number"
) -> None:
    """`value` in [low, high] (or [low, high) with high_open)."""
    above = value >= high if high_open else value > high
    if value < low or above:
        bounds = f"[{_number(low)}, {_number(high)}{')' if high_open else ']'}"
        raise ValueError(f"config key '{key}' is {value}; expected {what} in {bounds}.")


def check_at_least(key: str, value: Any, low: float, why: str = "") -> None:
    if value < low:
        raise ValueError(f"config key '{key}' is {value}; expected {_number(low)} or more{why}.")


def check_finite_fields(section: Any, prefix: str) -> None:
    """Every float field of a config dataclass finite (nan and inf are never a setting), named `prefix.field`."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config key '{prefix}.{f.name}' is {value}; expected a finite number.")
