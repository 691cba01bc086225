"""train.plan: what a run derives from its config is its RunPlan, recorded beside the config and applied when a
saved config is read back (of either layout)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from launch.config import load_config, to_dict
from tests.helpers import TINY
from train.config import MOVED_KEYS
from train.errors import TrainError
from train.plan import PLAN_FILE, effective_config, plan_run, saved_config, write_plan


def test_the_plan_derives_and_the_config_stays_as_written(tmp_path):
    cfg = load_config(TINY, ["train.max_tokens=100000", "train.micro_batch_size=4", "model.vocab_size=4096"])
    before = to_dict(cfg)
    plan = plan_run(cfg, world_size=2)
    assert (plan.global_batch_size, plan.tokens_per_step) == (8, 8 * cfg.model.max_seq_len)
    assert plan.max_steps == -(-100000 // plan.tokens_per_step) and cfg.train.max_steps == 300  # as written
    assert plan.vocab_size == 4096 and plan.model(cfg.model) is cfg.model
    settled = dataclasses.replace(plan, vocab_size=320)
    assert settled.model(cfg.model).vocab_size == 320 and cfg.model.vocab_size == 4096
    assert to_dict(cfg) == before  # planning never writes into the config
    write_plan(tmp_path, settled)
    record = json.loads((tmp_path / PLAN_FILE).read_text())
    assert record == settled.to_dict() and record["tokens_per_step"] == settled.tokens_per_step
    with pytest.raises(TrainError, match="schedule.warmup_steps"):
        plan_run(load_config(TINY, ["train.max_tokens=1000", "schedule.warmup_steps=20"]), world_size=1)


def test_a_saved_config_is_read_back_with_its_plan_and_from_the_old_layout():
    cfg = load_config(TINY, ["checkpoint.every=7", "optim.lr=1e-3"])
    new = to_dict(cfg)
    meta = {"config": new, "plan": {"vocab_size": 320, "max_steps": 9}}
    back = saved_config(meta["config"], meta["plan"])
    assert back.model.vocab_size == 320 and back.checkpoint.every == 7 and back.optim.lr == 1e-3
    assert new["model"]["vocab_size"] == 4096  # the record itself is left as written
    old = json.loads(json.dumps(new))
    for old_key, new_key in MOVED_KEYS.items():
        section, name = new_key.split(".", 1)
        old["train"][old_key.split(".", 1)[1]] = old[section].pop(name)
    old["model"]["vocab_size"] = 320  # old runs wrote the settled vocab_size into the config, and had no plan
    assert saved_config(old, None) == back
    assert effective_config(old, None) == effective_config(new, meta["plan"])
