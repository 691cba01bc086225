"""Non-finite or contradictory numbers and malformed sections are config errors naming the key, at load time."""

from __future__ import annotations

import pytest

from launch.cli import main
from launch.config import ConfigError, load_config
from tests.helpers import TINY
from train.errors import TrainError
from train.handoff.generate import generate_cli


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=nan"], "'optim.lr' is nan; expected a finite number"),
        (["optim.lr=inf"], "'optim.lr' is inf; expected a finite number"),
        (["schedule.min_lr=-inf"], "'schedule.min_lr' is -inf"),
        (["model.rope_theta=nan"], "'model.rope_theta' is nan"),
        (["data.val_fraction=nan"], "'data.val_fraction' is nan"),
        (["data.sources=[{path: a.txt, weight: .inf}]"], r"'data.sources\[0\].weight' is inf"),
        (
            ["schedule.warmup_steps=300"],
            r"'schedule.warmup_steps' \(300\) is not below 'train.max_steps' \(300\)",
        ),
        (["schedule.warmup_steps=20", "train.max_steps=10"], r"'schedule.warmup_steps' \(20\) is not below"),
        (["schedule.min_lr=0.01"], r"'schedule.min_lr' \(0.01\) is above 'optim.lr' \(0.003\)"),
        (["optim.lr=0"], "'optim.lr' is 0.0; expected a positive learning rate"),
        (["train.max_time=nan"], "'train.max_time' is nan"),
        (["train.max_time=-1"], "'train.max_time' is -1.0"),
        (["optim.name=sgd"], "'optim.name' is 'sgd'"),
        (["optim.muon_lr=0"], "'optim.muon_lr' is 0.0"),
        (["optim.muon_momentum=1"], r"'optim.muon_momentum' is 1.0; expected a number in \[0, 1\)"),
        (["optim.muon_ns_method=svd"], "'optim.muon_ns_method' is 'svd'"),
        (
            ["optim.name=muon", "train.on_nonfinite=skip", "train.zero_stage=0", "train.precision=fp32"],
            "a step cannot be skipped there",
        ),
        (
            ["optim.name=muon", "guard.action=skip", "train.zero_stage=0", "train.precision=fp32"],
            "'guard.action=skip' at ZeRO 0 in fp32: .* or guard.action=warn or rollback",
        ),
        (["guard.window=0"], "'guard.window' is 0; expected a positive integer"),
        (["profile.steps=[3]"], r"'profile.steps' is \[3\]; expected \[first, last\]"),
        (
            ["optim.name=muon", "train.zero_stage=2"],
            r"'optim.grad_clip' is 1.0 with optim.name=muon at ZeRO 2.*#8439",
        ),
        (
            ["optim.name=muon", "train.zero_stage=3", "optim.grad_clip=0", "train.grad_accum_steps=2"],
            r"'train.grad_accum_steps' is 2 with optim.name=muon at ZeRO 3.*#8443",
        ),
        # Values that used to pass and misbehave (a negative clip disabled clipping, -1 processes meant all cores).
        (["optim.weight_decay=-0.1"], "'optim.weight_decay' is -0.1; expected 0 or more"),
        (["optim.grad_clip=-1"], r"'optim.grad_clip' is -1.0; expected 0 or more \(0 disables clipping\)"),
        (["optim.beta1=1.0"], r"'optim.beta1' is 1.0; expected a number in \[0, 1\)"),
        (["optim.beta2=-0.5"], r"'optim.beta2' is -0.5; expected a number in \[0, 1\)"),
        (["optim.eps=0"], "'optim.eps' is 0.0; expected a positive number"),
        (["export.every=-1"], "'export.every' is -1; expected 0 or more"),
        (["checkpoint.every=-1"], "'checkpoint.every' is -1; expected a positive integer"),
        (["data.num_proc=-1"], r"'data.num_proc' is -1; expected 0 or more \(0: all cores\)"),
        (["data.num_workers=-2"], "'data.num_workers' is -2; expected 0 or more"),
        (["tokenizer.max_train_docs=0"], "'tokenizer.max_train_docs' is 0; expected 1 or more"),
        (
            ["run.seed=-1"],
            r"'run.seed' is -1; expected an integer \(numpy's seed range\) in \[0, 4294967295\]",
        ),
        (["run.seed=4294967296"], "'run.seed' is 4294967296"),
    ],
)
def test_bad_numbers_are_refused_by_slm_config_show(overrides, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)
    assert main(["config", "show", TINY, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_token_budget_runs_are_not_refused_for_their_max_steps():
    cfg = load_config(
        TINY, ["train.max_steps=1", "train.max_tokens=1000000"]
    )  # max_steps comes from the budget
    assert cfg.train.max_tokens == 1000000


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("model: 5\n", "config key 'model' is 5 \\(type int\\); expected a mapping of model settings"),
        ("train: [1, 2]\n", "config key 'train' is \\[1, 2\\] \\(type list\\); expected a mapping"),
        (
            "data:\n  sources: oops\n",
            "config key 'data.sources' is 'oops' \\(type str\\); expected a list of mappings",
        ),
        ("data:\n  sources: [3]\n", "config key 'data.sources\\[0\\]' is 3"),
        ("log:\n  wandb: off\n", "config key 'log.wandb'"),
    ],
)
def test_a_section_that_is_not_a_mapping_is_named(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=f"Config file '{path}': {message}"):
        load_config(str(path))


@pytest.mark.parametrize("item", ["model..x=1", ".model=1", "model.=3", " =1"])
def test_override_key_with_an_empty_part_is_named(item):
    with pytest.raises(ConfigError, match="has an empty part in its key"):
        load_config(TINY, [item])


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_generate_refuses_a_non_finite_temperature_before_loading(tmp_path, temperature):
    with pytest.raises(TrainError, match="--temperature"):
        generate_cli(tmp_path / "nothing", "hi", temperature=temperature)


def test_an_error_names_where_the_bad_value_came_from(tmp_path):
    """Issue 21: an override's bad value was reported as the config file's."""
    with pytest.raises(ConfigError, match=r"^Command-line override 'model.n_layers=-1': model.n_layers=-1"):
        load_config(TINY, ["train.max_steps=5", "model.n_layers=-1"])
    preset = tmp_path / "bad.yaml"
    preset.write_text("model:\n  n_layers: -2\n")
    with pytest.raises(ConfigError, match=rf"^Config file '{preset}': model.n_layers=-2"):
        load_config(str(preset), ["train.max_steps=5"])
    with pytest.raises(
        ConfigError, match=r"'tokenizer.vocab_size' is 1000000000000; expected .* \[1, 4294967296\]"
    ):
        load_config(TINY, ["tokenizer.vocab_size=1000000000000"])  # no "needs uint32" claim past uint32
