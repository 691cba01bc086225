"""train.init_from as a URL: an export on a real S3 server (SeaweedFS on loopback) is copied once into the
local cache, reused while it matches the store, refused when it is not an export, and a CPT run started from
the URL begins at the export's own loss."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from data_pipeline.loading.loader import build_loader
from launch.config import load_config
from model import Transformer
from tests.helpers import TINY, run, slm_cmd
from tests.helpers import test_env as make_env
from tests.s3_localhost import BUCKET
from train.errors import TrainError
from train.handoff.export import export_from_model
from train.handoff.init_from import build_model, load_init_weights
from train.handoff.remote_export import fetch_export

SHAPE = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=96",
    "model.max_seq_len=64",
    "model.vocab_size=4096",
]
RUN = [
    "train.precision=fp32",
    "train.zero_stage=1",
    "train.micro_batch_size=2",
    "train.max_steps=2",
    "schedule.warmup_steps=1",
    "optim.lr=1e-3",
    "schedule.min_lr=1e-4",
    "log.every=1",
    "eval.every=2",
    "eval.batches=1",
    "checkpoint.every=2",
    "run.seed=1337",
]


@pytest.fixture(scope="module")
def s3_export(s3_server, tiny_data_dir, tmp_path_factory):
    """A freshly initialised tiny model exported (fp32) locally and uploaded to s3://."""
    cfg = load_config(TINY, SHAPE)
    torch.manual_seed(0)
    local = export_from_model(
        Transformer(cfg.model).state_dict(),
        cfg.model,
        tiny_data_dir / "tokenizer.json",
        tmp_path_factory.mktemp("export") / "tiny",
        dtype="fp32",
        verify=False,
    )
    prefix = f"{BUCKET}/exports-{uuid.uuid4().hex[:8]}"
    fs = s3_server.filesystem()
    for path in local.iterdir():
        fs.put_file(str(path), f"{prefix}/tiny/{path.name}")
    return local, f"s3://{prefix}/tiny", fs, prefix


def test_an_export_url_is_copied_once_and_reused(s3_export, s3_env, tmp_path):
    local, url, _, _ = s3_export
    copy = fetch_export(url, cache_dir=str(tmp_path))
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in local.iterdir())
    for path in local.iterdir():
        assert (copy / path.name).read_bytes() == path.read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    assert fetch_export(url, cache_dir=str(tmp_path)) == copy  # reused: nothing downloaded again
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == stamps
    weights, _, sha = load_init_weights(copy)
    reference, _, reference_sha = load_init_weights(local)
    assert sha == reference_sha and all(torch.equal(weights[k], reference[k]) for k in reference)


def test_a_url_that_is_not_an_export_is_refused(s3_export, s3_env, tmp_path):
    _, _, fs, prefix = s3_export
    fs.pipe_file(f"{prefix}/not-an-export/notes.txt", b"hello")
    with pytest.raises(TrainError, match=r"not-an-export is not a Hugging Face export.*notes\.txt"):
        fetch_export(f"s3://{prefix}/not-an-export", cache_dir=str(tmp_path))
    assert fs.cat_file(f"{prefix}/not-an-export/notes.txt") == b"hello"  # nothing on the store is touched


@pytest.mark.slow
def test_cpt_from_an_export_url_starts_at_its_loss(s3_export, s3_server, tiny_data_dir, tmp_path):
    local, url, _, _ = s3_export
    run_dir = tmp_path / "cpt"
    run(
        slm_cmd(
            [
                "train",
                TINY,
                f"run.dir={run_dir}",
                f"data.dir={tiny_data_dir}",
                "train.stage=cpt",
                f"train.init_from={url}",
                f"data.cache_dir={tmp_path / 'cache'}",
                *SHAPE,
                *RUN,
            ]
        ),
        env=make_env(s3_server.env),
        timeout=300,
    )
    first = next(
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line and json.loads(line).get("step") == 1
    )
    batch = next(iter(build_loader(tiny_data_dir, "train", 64, 2, 0, 1, 1337)))
    state_dict, cfg, _ = load_init_weights(local)
    with torch.no_grad():
        _, loss = build_model(state_dict, cfg)(batch["input_ids"], batch["labels"])
    assert first == pytest.approx(loss.item(), abs=1e-5)
