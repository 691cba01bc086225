"""Config checks the schema's types cannot express: finite numbers, consistent schedules, the shape of YAML
sections and of override keys. Each raises ValueError with a message naming the key; launch.config turns it
into a ConfigError with the config's origin."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping, Tuple


def numbers(obj: Any, prefix: str = "") -> Iterator[Tuple[str, float]]:
    """(dotted key, value) of every float (or int) field of a config dataclass, list elements included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from numbers(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from numbers(item, f"{key}[{i}].")
        elif isinstance(value, float) and not isinstance(value, bool):
            yield key, value


def check_numbers(cfg: Any) -> None:
    """Every float finite; the learning-rate schedule consistent (the trainer checks it again after max_tokens)."""
    for key, value in numbers(cfg):
        if not math.isfinite(value):
            raise ValueError(f"config key '{key}' is {value}; expected a finite number.")
    train = cfg.train
    if not train.lr > 0:
        raise ValueError(f"config key 'train.lr' is {train.lr}; expected a positive learning rate.")
    if train.min_lr < 0:
        raise ValueError(f"config key 'train.min_lr' is {train.min_lr}; expected 0 or a positive number.")
    if train.min_lr > train.lr:
        raise ValueError(f"config key 'train.min_lr' ({train.min_lr}) is above 'train.lr' ({train.lr}); expected min_lr <= lr.")
    if train.warmup_steps < 0:
        raise ValueError(f"config key 'train.warmup_steps' is {train.warmup_steps}; expected 0 or a positive integer.")
    if train.max_tokens is None and train.warmup_steps >= train.max_steps > 0:
        raise ValueError(
            f"config key 'train.warmup_steps' ({train.warmup_steps}) is not below 'train.max_steps' ({train.max_steps}): "
            "the run would end before the learning rate reaches its peak. Lower train.warmup_steps.")
    if train.max_time is not None and train.max_time < 0:
        raise ValueError(f"config key 'train.max_time' is {train.max_time}; expected seconds >= 0 or null.")
    if train.peak_flops is not None and not train.peak_flops > 0:
        raise ValueError(f"config key 'train.peak_flops' is {train.peak_flops}; expected a positive number or null.")


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
                raise ValueError(f"config key '{key}' is {value!r} (type {type(value).__name__}); expected a mapping of "
                                 f"{key} settings, e.g. {key}: {{{dataclasses.fields(default)[0].name}: ...}}.")
            check_sections(value, type(default), key + ".")
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            if not isinstance(value, list):
                raise ValueError(f"config key '{key}' is {value!r} (type {type(value).__name__}); expected a list of mappings.")
            for i, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise ValueError(f"config key '{key}[{i}]' is {item!r} (type {type(item).__name__}); expected a mapping.")
                check_sections(item, type(default[0]), f"{key}[{i}].")


def check_override_key(item: str) -> None:
    """`a..b=1`, `.a=1`, `a.=1`: an empty part of a dotted key."""
    key = item.split("=", 1)[0]
    if not key.strip() or any(not part.strip() for part in key.split(".")):
        raise ValueError(f"Command-line override '{item}' has an empty part in its key '{key}'; expected dotted names "
                         "such as model.n_layers=3.")
