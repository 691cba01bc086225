"""Value checks shared by every config section's `validate()`: each raises ValueError naming the dotted key,
the value and what was expected (launch.config adds where the value came from)."""

from __future__ import annotations

from typing import Any, Sequence


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"config key '{key}' is {value!r}; expected one of {', '.join(map(str, allowed))}.")


def check_positive(key: str, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"config key '{key}' is {value}; expected a positive integer.")
