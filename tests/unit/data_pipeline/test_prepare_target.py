"""`slm prepare` never writes over, or cleans away, files it did not write."""

from __future__ import annotations

import pytest

from data_pipeline.errors import DataError
from data_pipeline.prepare.dispatch import prepare
from launch.config import load_config
from tests.helpers import SHAKESPEARE, TINY


def config(data_dir):
    return load_config(
        TINY, [f"data.dir={data_dir}", "data.num_proc=1", f"data.sources=[{{path: {SHAKESPEARE}}}]"]
    )


@pytest.mark.parametrize("names", [["notes.txt"], ["tinyshakespeare-train-00003.bin"], ["tokenizer.json"]])
def test_a_fresh_prepare_refuses_a_folder_holding_other_files(tmp_path, names):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in names:
        (data_dir / name).write_text("mine")
    cfg = config(data_dir)
    with pytest.raises(
        DataError, match=f"already holds files that `slm prepare` did not write \\({names[0]}"
    ):
        prepare(cfg.data, cfg.tokenizer)
    for name in names:
        assert (data_dir / name).read_text() == "mine"
    assert not (data_dir / ".prepare").exists()
