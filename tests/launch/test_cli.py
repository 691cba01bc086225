"""The `slm` command line as a user runs it: real subprocesses, exit codes, messages."""

from __future__ import annotations

import pytest

from tests.helpers import TINY, run, slm_cmd


def test_help_lists_the_subcommands():
    out = run(slm_cmd(["--help"])).stdout
    for command in ("config", "model", "prepare", "train", "report", "export", "generate", "slurm"):
        assert command in out


def test_config_show_applies_overrides():
    out = run(slm_cmd(["config", "show", TINY, "model.n_layers=3"])).stdout
    assert "n_layers: 3" in out and "d_model: 128" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["config", "show", TINY, "model.n_layer=3"], "model.n_layers"),
        (["config", "show", "configs/missing.yaml"], "configs/missing.yaml"),
        (["model", "summary", TINY, "model.d_model=130"], "model.d_model"),
    ],
)
def test_bad_input_exits_nonzero_without_traceback(args, needle):
    proc = run(slm_cmd(args), check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
