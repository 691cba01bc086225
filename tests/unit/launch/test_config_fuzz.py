"""Property-based: any YAML mapping and any overrides give either a valid Config or a one-paragraph ConfigError."""

from __future__ import annotations

import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch.config import Config, ConfigError, load_config, valid_keys

KEYS = [k.replace("[]", "") for k in valid_keys()]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["nan", "inf", "-1", "0", "1e-3", "auto", "null", "[]", "{}"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
KEY = st.one_of(st.sampled_from(KEYS), st.text(alphabet="abcdefgnrt_.[]0", min_size=1, max_size=12))


def nest(flat: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}} (later keys overwrite clashing earlier ones)."""
    root: dict = {}
    for key, value in flat.items():
        node = root
        parts = [p for p in key.split(".") if p] or ["_"]
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return root


def check(path, overrides) -> None:
    try:
        cfg = load_config(str(path), overrides)
    except ConfigError as err:
        message = str(err)
        assert message and "Traceback" not in message and len(message) < 2000
        return
    assert isinstance(cfg, Config)


@settings(
    max_examples=int(os.environ.get("SLM_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(flat=st.dictionaries(KEY, VALUES, max_size=4))
def test_random_yaml_is_a_config_or_a_clear_error(tmp_path, flat):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(nest(flat)))
    check(path, [])


@settings(
    max_examples=int(os.environ.get("SLM_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(items=st.lists(st.tuples(KEY, st.one_of(SCALARS.map(str), st.text(max_size=10))), max_size=3))
def test_random_overrides_are_a_config_or_a_clear_error(tmp_path, items):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    check(path, [f"{key}={value}" for key, value in items])
