"""`data.document_mask: true` reaches the model in a real `slm train` run: documents split at EOT tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY, run, slm_cmd

pytestmark = pytest.mark.slow

SHRINK = [
    "model.n_layers=1",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.max_seq_len=64",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "train.zero_stage=0",
    "train.max_steps=2",
    "schedule.warmup_steps=1",
    "log.every=1",
    "eval.every=2",
    "checkpoint.every=2",
    "eval.batches=2",
    "data.num_workers=0",
]


def first_loss_and_val(run_dir: Path) -> tuple:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r.get("kind") == "train"]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return train[0], val[-1]


def test_document_mask_changes_what_the_model_sees(tmp_path, tiny_data_dir):
    results = {}
    for masked in (False, True):
        run_dir = tmp_path / f"masked_{masked}"
        run(
            slm_cmd(
                [
                    "train",
                    TINY,
                    f"run.dir={run_dir}",
                    f"data.dir={tiny_data_dir}",
                    *SHRINK,
                    f"data.document_mask={str(masked).lower()}",
                ]
            ),
            timeout=600,
        )
        results[masked] = first_loss_and_val(run_dir)
    # Same weights, same batches (blank-line documents, so every window holds EOTs): only attention and
    # positions differ, so the very first loss already differs, and validation is masked as well.
    assert results[True][0] != results[False][0]
    assert results[True][1] != results[False][1]
