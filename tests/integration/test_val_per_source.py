"""Validation per source: with two data sources every eval row holds each source's own loss and bits per byte
beside the mixed figure, in a pretraining run and in a CPT run with replay (real `slm train`, 1 process, fp32).

About 80 s on 2 cores: the two real runs (4 and 2 steps, with the prepare of the two-source data) are shared by
both tests through a module fixture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from data_pipeline.format.manifest import load_manifest
from data_pipeline.loading.loader import build_loader
from tests.helpers import SELF_INSTRUCT, SHAKESPEARE, run, slm_cmd
from tests.runs import rows, train_args
from train.batch import take_batches
from train.checkpoint import find_checkpoint, read_record
from train.evaluate import evaluate
from train.handoff.init_from import build_model, load_init_weights

pytestmark = pytest.mark.slow

SOURCES = ("tinyshakespeare", "self_instruct_seed_tasks")
TWO_SOURCES = (
    f"data.sources=[{{path: {SHAKESPEARE}, doc_boundary: blank_line, weight: 3}}, "
    f"{{path: {SELF_INSTRUCT}, text_field: instruction, weight: 1}}]"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data_dir):
    """A 4-step two-source pretraining run, then a 2-step CPT run from it on the same two sources (the new
    domain, self-instruct, with tinyshakespeare as replay); the data is prepared by the first run."""
    root = tmp_path_factory.mktemp("per_source")
    data = root / "data"
    common = [TWO_SOURCES, f"tokenizer.path={tiny_data_dir / 'tokenizer.json'}", "data.num_proc=1"]
    common += ["train.zero_stage=0", "eval.every=2"]
    pretrain, cpt = root / "pretrain", root / "cpt"
    out = run(slm_cmd(train_args(pretrain, data, *common, "train.max_steps=4")))
    cpt_args = [
        *common,
        "train.stage=cpt",
        f"train.init_from={pretrain}",
        "train.max_steps=2",
        "schedule.warmup_steps=1",
    ]
    run(slm_cmd(train_args(cpt, data, *cpt_args)))
    return {"data": data, "pretrain": pretrain, "cpt": cpt, "stdout": out.stdout}


def check_rows(run_dir: Path, data: Path, steps: list) -> list:
    """Each eval row has both sources' figures, and the mixed ones are their token (bytes) weighted means."""
    manifest = load_manifest(data)
    tokens = {name: manifest.tokens("val", name) for name in SOURCES}
    text_bytes = {name: sum(s.text_bytes for s in manifest.shards_of("val", name)) for name in SOURCES}
    evals = rows(run_dir, "eval")
    assert [r["step"] for r in evals] == steps
    for row in evals:
        loss = {name: row[f"val/{name}/loss"] for name in SOURCES}
        bpb = {name: row[f"val/{name}/bpb"] for name in SOURCES}
        assert loss[SOURCES[0]] != loss[SOURCES[1]]  # two different texts, scored apart
        for name in SOURCES:
            assert bpb[name] == pytest.approx(loss[name] / math.log(2) / (text_bytes[name] / tokens[name]))
        mixed = sum(tokens[n] * loss[n] for n in SOURCES) / sum(tokens.values())
        assert row["val_loss"] == pytest.approx(mixed, rel=1e-12)
        assert row["val_ppl"] == pytest.approx(math.exp(mixed))
        by_bytes = sum(text_bytes[n] * bpb[n] for n in SOURCES) / sum(text_bytes.values())
        assert row["val_bpb"] == pytest.approx(by_bytes, rel=1e-12)
        assert row["val_bpb"] == pytest.approx(mixed / math.log(2) / manifest.bytes_per_token("val"))
    return evals


def test_two_source_run_logs_each_source_apart(runs):
    evals = check_rows(runs["pretrain"], runs["data"], [2, 4])
    # The figure is that source's own text: the final weights on batches drawn from that source alone (the
    # loader the run uses, eval.batches=2 of micro-batch 4, seed 1337) give the same loss.
    state_dict, cfg, _ = load_init_weights(str(runs["pretrain"]))
    model = build_model(state_dict, cfg)
    for name in SOURCES:
        loader = build_loader(
            runs["data"], "val", 32, 4, 0, 1, 1337, weights={n: float(n == name) for n in SOURCES}
        )
        scores = evaluate(model, take_batches(loader, 2), model.embed_tokens.weight.device, None)
        assert evals[-1][f"val/{name}/loss"] == pytest.approx(scores["val_loss"], rel=1e-5)
    console = [line for line in runs["stdout"].splitlines() if line.startswith("eval step 4")]
    assert (
        len(console) == 1
        and f"val/{SOURCES[1]}/loss " in console[0]
        and f"val/{SOURCES[0]}/bpb " in console[0]
    )


def test_cpt_run_with_replay_logs_the_new_domain_and_replay_apart(runs):
    evals = check_rows(runs["cpt"], runs["data"], [2])
    assert read_record(find_checkpoint(runs["cpt"])).identity.stage == "cpt"
    assert set(evals[0]) >= {f"val/{name}/{m}" for name in SOURCES for m in ("loss", "bpb")}
