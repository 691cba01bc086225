"""optim.name=muon: DeepSpeed's MuonWithAuxAdam in real `slm train` runs under ZeRO 0-3.

The reference is one plain process at ZeRO 0 in fp32, where Muon sees whole matrices. Two processes at
ZeRO 1, 2 and 3 must follow its curve: their optimizer holds flat partitions, so the curve only agrees if
each matrix's whole gradient is orthogonalized before it is partitioned (per partition it would not be).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest

from tests.helpers import run, slm_cmd
from tests.runs import ONE_PROC, STEPS, losses, train_args

pytestmark = pytest.mark.slow

MUON = ["optim.name=muon", "optim.muon_lr=0.02", "optim.lr=3e-3", "optim.grad_clip=0", "data.num_proc=1"]


class MuonRuns:
    """Muon runs by (ZeRO stage, processes), made on first use; the output of each is kept."""

    def __init__(self, tmp_path_factory, data_dir: Path):
        self.factory, self.data_dir = tmp_path_factory, data_dir
        self.made: Dict[Tuple[int, int], Tuple[Path, str]] = {}

    def __call__(self, stage: int, nproc: int) -> Tuple[Path, str]:
        if (stage, nproc) not in self.made:
            run_dir = self.factory.mktemp(f"muon_zero{stage}_{nproc}") / "run"
            extra = [*MUON, f"train.zero_stage={stage}", *(ONE_PROC if nproc == 1 else [])]
            out = run(slm_cmd(train_args(run_dir, self.data_dir, *extra), nproc=nproc))
            self.made[stage, nproc] = run_dir, out.stderr  # the status lines (the train rows are on stdout)
        return self.made[stage, nproc]


@pytest.fixture(scope="module")
def muon_runs(tmp_path_factory, tiny_data_dir) -> MuonRuns:
    return MuonRuns(tmp_path_factory, tiny_data_dir)


def test_muon_takes_the_matrices_and_learns_otherwise_than_adamw(muon_runs, single_run):
    run_dir, out = muon_runs(0, 1)
    # 2 layers x (q, k, v, o, gate, up, down); the tied embedding and the norms get AdamW.
    assert (
        "optimizer: Muon (lr 0.02, momentum 0.95, standard Newton-Schulz) for 14 matrices, AdamW (lr 0.003)"
        in out
    )
    muon, adamw = losses(run_dir), losses(single_run)
    assert sorted(muon) == list(range(1, STEPS + 1))
    assert sum(muon[s] for s in (10, 11, 12)) / 3 < sum(muon[s] for s in (1, 2, 3)) / 3 - 0.3, muon
    assert muon[1] == pytest.approx(
        adamw[1], rel=1e-5
    )  # same init and batch: the optimizers part after step 1
    assert abs(muon[STEPS] - adamw[STEPS]) > 0.01, (muon, adamw)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_processes_follow_the_whole_matrix_curve(muon_runs, stage):
    reference, _ = muon_runs(0, 1)
    run_dir, out = muon_runs(stage, 2)
    one, two = losses(reference), losses(run_dir)
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (stage, step, one, two)


def test_muon_resume_is_bitwise_exact(muon_runs, tmp_path, tiny_data_dir):
    """Slow (about 30 s on 2 busy cores): a 2-process torchrun run resumed from step 6 of the module's ZeRO-2 Muon
    run (shared with the curve test), with its DeepSpeed start-up and checkpoint load on both ranks."""
    full, _ = muon_runs(2, 2)
    resumed = tmp_path / "resumed"
    out = run(
        slm_cmd(
            train_args(
                resumed,
                tiny_data_dir,
                *MUON,
                "train.zero_stage=2",
                f"checkpoint.resume={full / 'checkpoints' / 'step_00000006'}",
            ),
            nproc=2,
        )
    )
    assert "at step 6" in out.stderr
    again, reference = losses(resumed), losses(full)
    assert sorted(again) == list(range(7, STEPS + 1))
    assert all(again[s] == reference[s] for s in again), (again, reference)


def test_muon_world_size_change_is_refused_before_the_converter_fails(muon_runs, tmp_path, tiny_data_dir):
    """2 ranks -> 1 rank needs a universal checkpoint, whose converter knows only AdamW's state."""
    source, _ = muon_runs(2, 2)
    out = run(
        slm_cmd(
            train_args(
                tmp_path / "run",
                tiny_data_dir,
                *MUON,
                *ONE_PROC,
                "train.zero_stage=2",
                f"checkpoint.resume={source / 'checkpoints' / 'step_00000006'}",
            )
        ),
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot convert Muon's optimizer state" in out.stderr and "Traceback" not in out.stderr
    assert not (source / "checkpoints" / "step_00000006" / "tmp.universal").exists()
