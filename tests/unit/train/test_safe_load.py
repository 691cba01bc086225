"""Checkpoint pickles never run code: RNG files load with weights_only=True, DeepSpeed's files are scanned first."""

from __future__ import annotations

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
