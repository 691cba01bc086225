"""The typed config: presets load and validate, overrides apply, and every bad input names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.config import Config, ConfigError, from_dict, load_config, to_dict, to_yaml, valid_keys
from tests.helpers import REPO, TINY
from train.config import MOVED_KEYS, upgrade_config

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"tiny", "125m", "350m", "1b"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(preset: Path):
    cfg = load_config(str(preset))
    assert isinstance(cfg, Config)
    cfg.model.validate()
    assert cfg.data.sources and all(Path(REPO / s.path).exists() for s in cfg.data.sources)


def test_overrides_nested_and_lists():
    cfg = load_config(
        TINY,
        [
            "model.n_layers=3",
            "optim.lr=1e-4",
            "schedule.min_lr=1e-5",
            "log.wandb.tags=[a,b]",
            "data.sources=[{path: x.txt, weight: 3}, {path: y.jsonl, weight: 1, text_field: body}]",
        ],
    )
    assert cfg.model.n_layers == 3
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.log.wandb.tags == ["a", "b"]
    assert [s.path for s in cfg.data.sources] == ["x.txt", "y.jsonl"]
    assert cfg.data.sources[1].text_field == "body" and cfg.data.sources[0].weight == 3.0


def test_round_trip_through_dict_and_yaml():
    cfg = load_config(TINY, ["model.n_layers=3"])
    assert from_dict(to_dict(cfg)) == cfg
    assert "n_layers: 3" in to_yaml(cfg)


def test_schema_keys_named_by_the_docs():
    keys = set(valid_keys())
    for key in (
        "run.dir",
        "run.seed",
        "model.n_layers",
        "model.d_model",
        "model.n_heads",
        "model.n_kv_heads",
        "model.ffn_hidden",
        "model.vocab_size",
        "model.max_seq_len",
        "model.rope_theta",
        "model.norm_eps",
        "model.tie_embeddings",
        "model.init_std",
    ):
        assert key in keys


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import data_pipeline.config
    import launch.config
    import model.config
    import train.config
    import train.downstream.config
    import train.optim_config
    import train.schedule

    for module in (
        model.config,
        data_pipeline.config,
        train.config,
        launch.config,
        train.downstream.config,
        train.optim_config,
        train.schedule,
    ):
        tree = ast.parse(inspect.getsource(module))
        for node in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    has_doc = isinstance(nxt, ast.Expr) and isinstance(
                        getattr(nxt, "value", None), ast.Constant
                    )
                    assert has_doc, f"{module.__name__}.{node.name}.{stmt.target.id} has no docstring"


@pytest.mark.parametrize(
    "overrides, key, extra",
    [
        (["model.n_layer=3"], "model.n_layer", "model.n_layers"),
        (["train.zero_stag=2"], "train.zero_stag", "train.zero_stage"),
        (["data.sources=[{pth: a.txt}]"], "data.sources[].pth", "data.sources[].path"),
        (["model.n_layers=abc"], "model.n_layers", "abc"),
        (["optim.lr=fast"], "optim.lr", "fast"),
        (["model.d_model=130"], "model.d_model", "model.n_heads"),
        (["model.n_kv_heads=3"], "model.n_kv_heads", "model.n_heads"),
        (["model.d_model=120", "model.n_heads=8"], "model.d_model", "odd"),
        (["model.n_layers=0"], "model.n_layers", "positive"),
        (["model.vocab_size=-5"], "model.vocab_size", "positive"),
        (["train.zero_stage=4"], "train.zero_stage", "0, 1, 2, 3"),
        (["train.precision=fp8"], "train.precision", "bf16"),
        (["data.val_fraction=1.5"], "data.val_fraction", "[0, 1)"),
        (["data.cache_limit=-1"], "data.cache_limit", ">= 0"),
        (["data.sources=[{path: a.txt, weight: 0}]"], "data.sources[0].weight", "positive"),
    ],
)
def test_bad_values_name_the_key(overrides, key, extra):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    message = str(err.value)
    assert key in message and extra in message
    assert "tiny.yaml" in message or "override" in message.lower()
    assert "\n" not in message


def test_bad_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert (
        str(bad) in str(err.value)
        and "model.n_layer" in str(err.value)
        and "model.n_layers" in str(err.value)
    )


def test_wrong_type_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch_size: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(bad) in str(err.value) and "train.micro_batch_size" in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(broken))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="scalar.yaml"):
        load_config(str(scalar))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="binary.yaml"):
        load_config(str(binary))


def test_override_without_equals():
    with pytest.raises(ConfigError, match="model.n_layers"):
        load_config(TINY, ["model.n_layers"])


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  max_steps: 5\nmodel:\n  n_layers: 2\ntrain:\n  micro_batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one mapping \(lines 1 and 5\)"):
        load_config(str(path))
    path.write_text("model:\n  n_layers: 2\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml' is refused: key 'n_layers' appears twice"):
        load_config(str(path))


def test_alias_bombs_and_deep_nesting_are_refused_quickly(tmp_path):
    import time

    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]  # 10^7 leaves
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match="bomb.yaml' is refused: it uses more than 100 aliases or expands to"
    ):
        load_config(str(path))
    assert time.monotonic() - started < 30, "the bomb must be refused before it is expanded"
    path.write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(str(path))


def test_a_few_anchors_are_fine(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("model:\n  n_layers: &layers 3\nrun:\n  seed: *layers\n")
    cfg = load_config(str(path))
    assert (cfg.model.n_layers, cfg.run.seed) == (3, 3)


def test_each_section_is_owned_by_what_uses_it():
    keys = set(valid_keys())
    for key in (
        "optim.name",
        "optim.eps",
        "schedule.name",
        "schedule.min_lr",
        "checkpoint.every",
        "checkpoint.keep",
        "checkpoint.resume",
        "checkpoint.verify_hashes",
        "export.every",
        "export.dtype",
        "eval.every",
        "eval.batches",
        "log.every",
        "log.peak_flops",
    ):
        assert key in keys
    assert not {k for k in keys if k.startswith("train.")} & set(MOVED_KEYS)


@pytest.mark.parametrize("old, new", sorted(MOVED_KEYS.items()))
def test_a_moved_key_names_its_new_place_in_overrides_and_yaml(old, new, tmp_path):
    value = {"train.resume": "auto", "train.optimizer": "adamw", "train.schedule": "cosine"}.get(old, "1")
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"{old}={value}"])
    message = str(err.value)
    assert f"config key '{old}' moved to '{new}'" in message and f"{new}={value}" in message
    section, name = old.split(".")
    bad = tmp_path / "old.yaml"
    bad.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    message = str(err.value)
    assert str(bad) in message and f"config key '{old}' moved to '{new}'" in message and "\n" not in message


def test_old_saved_configs_are_upgraded_when_read_back():
    cfg = load_config(
        TINY, ["optim.name=muon", "optim.grad_clip=0", "checkpoint.every=7", "log.peak_flops=1e12"]
    )
    new = to_dict(cfg)
    old = {section: dict(values) if isinstance(values, dict) else values for section, values in new.items()}
    old["train"] = dict(new["train"])
    for old_key, new_key in MOVED_KEYS.items():
        section, name = new_key.split(".", 1)
        old["train"][old_key.split(".", 1)[1]] = old[section].pop(name)
    old = {k: v for k, v in old.items() if v != {} or k == "deepspeed"}
    assert upgrade_config(old) == new
    assert from_dict(old) == cfg and from_dict(new) == cfg
    assert upgrade_config(new) == new  # the current layout passes through
    assert "ckpt_every" in old["train"]  # the caller's dict is left as it was
