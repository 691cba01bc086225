"""The `slm` command line as a user runs it: exit codes, messages. The CLI's main runs in this process
(slm_in_process): these commands start no process group and each subprocess would only add a start-up."""

from __future__ import annotations

import re

import pytest

from launch.cli import build_parser
from tests.helpers import TINY, slm_in_process

COMMANDS = ("config", "model", "prepare", "train", "report", "export", "generate", "slurm")


def test_help_lists_the_subcommands(capsys):
    code, out, _ = slm_in_process(capsys, "--help")
    assert code == 0
    # The command list only (argparse indents each sub-command by four spaces under COMMAND), not the
    # description, which says "pretrain small language models" and so contains "train" and "model" anyway.
    listed = re.findall(r"^    ([a-z]+) ", out, flags=re.MULTILINE)
    assert set(COMMANDS) <= set(listed), f"missing from the command list: {set(COMMANDS) - set(listed)}"
    for command in COMMANDS:  # and each one is a working sub-parser with its own help
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([command, "--help"])
        assert exited.value.code == 0


def test_config_show_applies_overrides(capsys):
    code, out, _ = slm_in_process(capsys, "config", "show", TINY, "model.n_layers=3")
    assert code == 0
    assert "n_layers: 3" in out and "d_model: 128" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["config", "show", TINY, "model.n_layer=3"], "model.n_layers"),
        (["config", "show", "configs/missing.yaml"], "configs/missing.yaml"),
        (["model", "summary", TINY, "model.d_model=130"], "model.d_model"),
    ],
)
def test_bad_input_exits_nonzero_without_traceback(args, needle, capsys):
    code, _, err = slm_in_process(capsys, *args)
    assert code != 0
    assert needle in err
    assert "Traceback" not in err
