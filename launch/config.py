"""Loading the run config: the typed schema (train.config.Config) filled from YAML plus `key=value`
overrides, validated with errors that name the key and where it came from. A key of the old one-section layout
(train.config.MOVED_KEYS, e.g. train.ckpt_every) is refused naming its new place; configs saved by older runs
are read through train.config.upgrade_config instead."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from launch.config_shape import check_moved_keys, check_moved_override, check_override_key, check_sections
from launch.yaml_strict import YamlConfigError, load_yaml
from train.config import (  # noqa: F401  (the CLI's and tests' entry point)
    MOVED_KEYS,
    Config,
    from_dict,
    to_dict,
    to_yaml,
)


class ConfigError(Exception):
    """A config problem, with a one-paragraph message for the user (no traceback)."""


def valid_keys(node: Any = None, prefix: str = "") -> List[str]:
    """Every dotted key of the schema (list elements described by their element type)."""
    cls = Config if node is None else node
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(valid_keys(type(default), name + "."))
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            keys.extend(valid_keys(type(default[0]), name + "[]."))
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _prefixes(cls: Any = Config, prefix: str = "") -> Dict[type, str]:
    """Map each config dataclass to the dotted prefix it lives under (list elements as `name[]`)."""
    found: Dict[type, str] = {cls: prefix}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            found.update(_prefixes(type(default), f"{prefix}{f.name}."))
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            found.update(_prefixes(type(default[0]), f"{prefix}{f.name}[]."))
    return found


def _key_of(err: OmegaConfBaseException) -> str:
    """The full dotted key of an omegaconf error (omegaconf drops the prefix inside list elements)."""
    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "?")
    prefix = _prefixes().get(getattr(err, "object_type", None), "")
    if prefix and not key.startswith(prefix.rstrip(".")):
        key = prefix + key
    return key


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        key = _key_of(err)
        raise ConfigError(f"{origin}: unknown config key '{key}'.{_suggest(key)}") from None
    except ValidationError as err:
        key = _key_of(err)
        value = getattr(err, "value", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(
            f"{origin}: bad value {value!r} for config key '{key}': {msg.rstrip('.')}."
        ) from None
    except OmegaConfBaseException as err:
        key = _key_of(err)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{origin}: config key '{key}' could not be set: {msg}.") from None
    except (TypeError, ValueError) as err:  # e.g. a key below a list (data.sources.path=...)
        raise ConfigError(
            f"{origin}: {' '.join(str(err).split())}; a key of a list section needs an index, e.g. "
            "data.sources[0].path=..., and a section needs a mapping."
        ) from None


def _read_yaml(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"Config file '{path}' does not exist or is not a file; expected a YAML preset such as configs/tiny.yaml."
        )
    try:
        text = p.read_text(encoding="utf-8")
        data = load_yaml(text)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Config file '{path}' could not be read: {err}.") from None
    except YamlConfigError as err:
        raise ConfigError(f"Config file '{path}' is refused: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file '{path}' must hold a YAML mapping of sections (run, model, data, ...), not a {type(data).__name__}."
        )
    try:
        check_moved_keys(data, MOVED_KEYS)  # before the schema merge, which would only call them unknown
        check_sections(data, Config)
    except ValueError as err:
        raise ConfigError(f"Config file '{path}': {err}") from None
    return data


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"Command-line override '{item}' is not of the form key=value (for example model.n_layers=3)."
            )
        try:
            check_override_key(item)
            check_moved_override(item, MOVED_KEYS)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError, IndexError, KeyError, TypeError, ValueError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"Command-line overrides {' '.join(overrides)} could not be parsed: {first}; expected "
            "key=value items such as model.n_layers=3."
        ) from None


def _origin_of(message: str, path: Optional[str], overrides: Sequence[str]) -> str:
    """Where the value an error names came from: the command-line override setting a key the message names
    (the last one wins, as in the merge), else the config file (else the schema defaults)."""
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message):
            return f"Command-line override '{item}'"
    return f"Config file '{path}'" if path is not None else "Config defaults"


def _check_values(cfg: Config, path: Optional[str], overrides: Sequence[str]) -> None:
    """Every section's validate() (beside its dataclass), with where the values came from."""
    try:
        cfg.validate()
    except ValueError as err:
        raise ConfigError(f"{_origin_of(str(err), path, overrides)}: {err}") from None


def load_config(path: Optional[str], overrides: Iterable[str] = ()) -> Config:
    """Schema defaults, then the YAML file, then `key=value` overrides; validated, as typed dataclasses."""
    overrides = list(overrides)
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _read_yaml(path), f"Config file '{path}'")
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), "Command-line override")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = _key_of(err)
        raise ConfigError(
            f"{_origin_of(key, path, overrides)}: config key '{key}' is missing or invalid: "
            f"{str(err).splitlines()[0]}."
        ) from None
    _check_values(cfg, path, overrides)
    return cfg
