"""Checkpoint pickles never run code: RNG files load with weights_only=True, DeepSpeed's files are scanned first."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint import ensure_universal
from train.checkpoint.rng_state import rng_state, set_rng_state
from train.checkpoint.safe_load import safe_load, scan_pickles
from train.errors import TrainError


class CreatesAFile:
    """A pickle payload: unpickling it calls os.system, which creates `target`."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def write_crafted(path: Path, target: Path, zip_format: bool = True) -> None:
    payload = {"python": CreatesAFile(target), "torch": torch.zeros(3)}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("zip_format", [True, False])
def test_crafted_rng_file_is_refused_and_runs_nothing(tmp_path, zip_format):
    target = tmp_path / "pwned"
    crafted = tmp_path / "rng_rank00000.pt"
    write_crafted(crafted, target, zip_format)
    with pytest.raises(TrainError, match="rng_rank00000.pt"):
        safe_load(crafted)
    with pytest.raises(TrainError, match="rng_rank00000.pt"):
        scan_pickles(tmp_path)
    assert not target.exists()


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn()  # cached gaussians are part of the state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(safe_load(path))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_plain_tensor_file_passes_the_scan(tmp_path):
    torch.save({"module": {"w": torch.ones(2)}, "shapes": torch.Size([2]), "step": 3}, tmp_path / "ok.pt")
    scan_pickles(tmp_path)
    assert safe_load(tmp_path / "ok.pt")["step"] == 3


def test_universal_conversion_scans_the_checkpoint_before_deepspeed_reads_it(tmp_path):
    step_dir = tmp_path / "step_00000002"
    step_dir.mkdir()
    target = tmp_path / "pwned"
    write_crafted(step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", target)
    (step_dir / "universal").mkdir()
    (step_dir / "universal" / "notes.txt").write_text("left alone when refused")
    with pytest.raises(TrainError, match="Refusing to load .*zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        ensure_universal(step_dir)
    assert not target.exists() and (step_dir / "universal" / "notes.txt").is_file()


def test_links_anywhere_under_a_checkpoint_are_refused_and_hard_links_are_scanned(tmp_path):
    """DeepSpeed follows links; the scan refuses them (to folders or files, at any depth) instead of skipping
    them, and a hard link is a file like any other: its content is scanned."""
    target = tmp_path / "pwned"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_crafted(elsewhere / "fp32.pt", target)
    step_dir = tmp_path / "step_00000002"
    (step_dir / "universal" / "zero").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, step_dir / "universal" / "zero" / "ok.pt")
    (step_dir / "universal" / "zero" / "layer").symlink_to(elsewhere)
    with pytest.raises(TrainError, match=r"universal/zero/layer is a symbolic link \(to .*elsewhere\)"):
        scan_pickles(step_dir)
    (step_dir / "universal" / "zero" / "layer").unlink()
    (step_dir / "universal" / "zero" / "fp32.pt").symlink_to(elsewhere / "fp32.pt")
    with pytest.raises(TrainError, match="universal/zero/fp32.pt is a symbolic link"):
        scan_pickles(step_dir)
    (step_dir / "universal" / "zero" / "fp32.pt").unlink()
    os.link(elsewhere / "fp32.pt", step_dir / "universal" / "zero" / "fp32.pt")
    with pytest.raises(TrainError, match="Refusing to load .*fp32.pt"):
        scan_pickles(step_dir)
    assert not target.exists()


def test_a_converted_universal_folder_is_reused_only_as_it_was_written(tmp_path):
    """universal/ is derived from its step folder: reused when every file matches universal.json, converted
    again otherwise (here the step folder is no real checkpoint, so the conversion fails clearly)."""
    from train.checkpoint.layout import COMPLETE, UNIVERSAL_RECORD
    from train.checkpoint.universal import universal_damage, universal_record

    step_dir = tmp_path / "step_00000002"
    universal = step_dir / "universal"
    (universal / "zero" / "w").mkdir(parents=True)
    torch.save({"param": torch.ones(3)}, universal / "zero" / "w" / "fp32.pt")
    (universal / UNIVERSAL_RECORD).write_text(json.dumps(universal_record(universal)))
    (universal / COMPLETE).write_text("universal\n")
    assert universal_damage(universal) is None and ensure_universal(step_dir) == universal

    torch.save({"param": torch.zeros(3)}, universal / "zero" / "w" / "fp32.pt")  # same size, other values
    assert universal_damage(universal) == "zero/w/fp32.pt differs from its record"
    with pytest.raises(TrainError, match="universal checkpoint failed"):
        ensure_universal(step_dir)  # converted again, never loaded as it was
    target = tmp_path / "pwned"
    write_crafted(universal / "zero" / "w" / "exp_avg.pt", target)
    assert universal_damage(universal) == "zero/w/exp_avg.pt is not in its record"
    with pytest.raises(TrainError, match="Refusing to load .*universal/zero/w/exp_avg.pt"):
        ensure_universal(step_dir)  # the scan before converting names the smuggled file
    assert not target.exists()
    (universal / UNIVERSAL_RECORD).unlink()
    assert universal_damage(universal) == f"no readable {UNIVERSAL_RECORD}"
