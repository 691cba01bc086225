"""Shape checks of what a user writes, before the schema sees it: a YAML section must be a mapping (`model: 5`
is refused by name), an override key has no empty part (`model..x=1`), and a key that moved to another section
(`train.ckpt_every`, now `checkpoint.every`) is refused naming its new place. Each raises ValueError naming the
key; launch.config turns it into a ConfigError with the config's origin. Value checks live in each config
dataclass's validate()."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def check_sections(data: Mapping[str, Any], schema: Any, prefix: str = "") -> None:
    """A YAML mapping must give a mapping where the schema has a section (`model: 5` is refused by name)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for name, value in data.items():
        f = fields.get(name) if isinstance(name, str) else None
        if f is None:
            continue  # unknown keys are reported by the merge, with a suggestion
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"config key '{key}' is {value!r} (type {type(value).__name__}); expected a mapping of "
                    f"{key} settings, e.g. {key}: {{{dataclasses.fields(default)[0].name}: ...}}."
                )
            check_sections(value, type(default), key + ".")
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            if not isinstance(value, list):
                raise ValueError(
                    f"config key '{key}' is {value!r} (type {type(value).__name__}); expected a list of mappings."
                )
            for i, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise ValueError(
                        f"config key '{key}[{i}]' is {item!r} (type {type(item).__name__}); expected a mapping."
                    )
                check_sections(item, type(default[0]), f"{key}[{i}].")


def check_override_key(item: str) -> None:
    """`a..b=1`, `.a=1`, `a.=1`: an empty part of a dotted key."""
    key = item.split("=", 1)[0]
    if not key.strip() or any(not part.strip() for part in key.split(".")):
        raise ValueError(
            f"Command-line override '{item}' has an empty part in its key '{key}'; expected dotted names "
            "such as model.n_layers=3."
        )


def check_moved_keys(data: Mapping[str, Any], moved: Mapping[str, str]) -> None:
    """A YAML mapping using a key of the old layout (e.g. train: {ckpt_every: 100}): ValueError naming the new key."""
    for key, new in moved.items():
        section, name = key.split(".", 1)
        block = data.get(section)
        if isinstance(block, Mapping) and name in block:
            new_section, new_name = new.split(".", 1)
            raise ValueError(
                f"config key '{key}' moved to '{new}'; write it as {new_section}: {{{new_name}: {block[name]!r}}} "
                f"instead of under {section}:."
            )


def check_moved_override(item: str, moved: Mapping[str, str]) -> None:
    """`train.ckpt_every=5`: ValueError naming the new key (`checkpoint.every=5`)."""
    key, value = item.split("=", 1)
    key = key.strip()
    if key in moved:
        raise ValueError(
            f"Command-line override '{item}': config key '{key}' moved to '{moved[key]}'; "
            f"write {moved[key]}={value} instead."
        )
