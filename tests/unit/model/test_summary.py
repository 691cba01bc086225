"""`slm model summary` as a user runs it, through the real CLI entry point."""

from __future__ import annotations

import re

import pytest

from launch.cli import main
from launch.config import load_config
from model.stats import param_counts
from tests.helpers import REPO, TINY


@pytest.mark.parametrize("preset, nominal", [("125m", 125e6), ("350m", 350e6), ("1b", 1e9)])
def test_summary_reports_parameters_near_the_preset_name(preset, nominal, capsys):
    path = str(REPO / "configs" / f"{preset}.yaml")
    assert main(["model", "summary", path, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    total = int(re.search(r"^\s*total\s+([\d,]+)", out, re.MULTILINE).group(1).replace(",", ""))
    assert abs(total - nominal) / nominal < 0.05, out
    assert total == param_counts(load_config(path).model)["total"]
    assert "non-embedding" in out and "GFLOP" in out and "world size 4" in out
    rows = re.findall(r"^\s*([0-3])\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[0][1]) == pytest.approx(
        16 * total / 1024**3, abs=0.001
    )  # stage 0: 16 bytes per parameter
    states = [float(r[1]) for r in rows]
    assert (
        states == sorted(states, reverse=True) and states[3] < states[0] / 3
    )  # ZeRO shards more at each stage


def test_summary_follows_overrides_and_rejects_a_bad_world_size(capsys):
    assert main(["model", "summary", TINY, "model.n_layers=8", "train.activation_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    assert "8 layers" in out and "activation checkpointing on" in out
    assert main(["model", "summary", TINY, "--world-size", "0"]) == 2
    assert "--world-size 0" in capsys.readouterr().err
