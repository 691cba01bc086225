"""Field checks for the JSON files we read back (meta.json, metrics rows, the prepare state, an export's
config.json): a hand-edited or damaged file is described in one phrase naming the field, never a traceback."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Type, Union

Spec = Union[Type[Any], Tuple[Optional[Type[Any]], ...]]
"""The types a field may hold: one type or a tuple of them (None allows null; float also takes an integer)."""

_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a JSON object",
    list: "a list",
    bool: "true or false",
    None: "null",
}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", dict: "object", list: "list"}.get(
        type(value), "value"
    )


def _fits(value: Any, kind: Optional[Type[Any]]) -> bool:
    if kind is None:
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def field_problem(
    record: Any, fields: Mapping[str, Spec], required: Sequence[str] = (), minimum: Mapping[str, int] = {}
) -> Optional[str]:
    """What is wrong with a parsed JSON object (None when nothing is): not an object, a required field
    missing, a field of another type, or an integer below its `minimum`."""
    if not isinstance(record, dict):
        return f"it is a JSON {json_type(record)}, expected an object"
    for key in required:
        if key not in record:
            return f"it lacks the field '{key}'"
    for key, spec in fields.items():
        if key not in record:
            continue
        kinds = spec if isinstance(spec, tuple) else (spec,)
        value = record[key]
        if not any(_fits(value, kind) for kind in kinds):
            expected = " or ".join(_NAMES.get(kind, getattr(kind, "__name__", str(kind))) for kind in kinds)
            return f"the field '{key}' is {json_type(value)} {str(value)[:40]!r}; expected {expected}"
        if key in minimum and isinstance(value, int) and value < minimum[key]:
            return f"the field '{key}' is {value}; expected {minimum[key]} or more"
    return None
