"""The `slm` command line as a user runs it: real subprocesses, exit codes, messages."""

from __future__ import annotations

import re

import pytest

from launch.cli import build_parser
from tests.helpers import TINY, run, slm_cmd

COMMANDS = ("config", "model", "prepare", "train", "report", "export", "generate", "slurm")


def test_help_lists_the_subcommands():
    out = run(slm_cmd(["--help"])).stdout
    # The command list only (argparse indents each sub-command by four spaces under COMMAND), not the
    # description, which says "pretrain small language models" and so contains "train" and "model" anyway.
    listed = re.findall(r"^    ([a-z]+) ", out, flags=re.MULTILINE)
    assert set(COMMANDS) <= set(listed), f"missing from the command list: {set(COMMANDS) - set(listed)}"
    for command in COMMANDS:  # and each one is a working sub-parser with its own help
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([command, "--help"])
        assert exited.value.code == 0


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
