"""train.startup / train.deepspeed_config: on one process the engine skips DeepSpeed work that is the identity there
(ZeRO 0's gradient all-reduce; on CPU ZeRO 1-2's contiguous gradient copies), and in bf16
the NaN scan a run that never skips a step does not need; it trains bitwise as DeepSpeed's defaults do."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY
from tests.helpers import test_env as make_env
from train.config import Config, TrainConfig
from train.deepspeed_config import build_deepspeed_config
from train.guard import GuardConfig
from train.optim_config import OptimConfig

CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
from launch.config import load_config
from train.batch import batch_loss
from train.distributed import setup_distributed
from train.plan import plan_run
from train.startup import build_engine

stage, precision = {stage}, {precision!r}
overrides = [f"train.zero_stage={{stage}}", f"train.precision={{precision}}", "model.n_layers=2", "model.d_model=64",
             "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128", "model.max_seq_len=32",
             "model.vocab_size=512", "train.micro_batch_size=4", "train.grad_accum_steps=2"]
dist_info = setup_distributed(load_config({tiny!r}, overrides).train)
one_rank_allreduce = stage == 0
flat_buckets = stage == 2 or (stage == 1 and precision != "bf16")
overflow_scan = stage == 2 and precision == "bf16"


def engine_for(extra):
    cfg = load_config({tiny!r}, overrides + extra)
    return build_engine(cfg, plan_run(cfg, 1), dist_info, None, universal=False)


def backward(engine, scale=1.0):
    tokens = torch.randint(0, 512, (4, 33))
    engine.backward(scale * batch_loss(engine, {{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}}))


results = []
for deepspeed_defaults in (False, True):
    block = {{}}
    if deepspeed_defaults and flat_buckets:
        block["zero_optimization"] = {{"contiguous_gradients": True}}
    if deepspeed_defaults and overflow_scan:
        block["bf16"] = {{"check_grad_overflow": True}}
    engine = engine_for([f"deepspeed={{json.dumps(block)}}"] if block else [])
    if one_rank_allreduce:
        assert engine.enable_backward_allreduce is False  # build_engine turns it off on one rank
        engine.enable_backward_allreduce = deepspeed_defaults
    if flat_buckets:
        assert engine.optimizer.contiguous_gradients is deepspeed_defaults
    if overflow_scan:
        assert engine.optimizer.check_grad_overflow is deepspeed_defaults
    torch.manual_seed(5)
    for _ in range(6):  # 3 optimizer steps of 2 micro-batches
        backward(engine)
        engine.step()
    results.append([p.detach().clone() for p in engine.module.parameters()])
print("EQUAL" if all(torch.equal(a, b) for a, b in zip(*results)) else "DIFFERENT")
if overflow_scan:  # a run that skips steps keeps the scan, and DeepSpeed drops a NaN step
    engine = engine_for(["train.on_nonfinite=skip"])
    assert engine.optimizer.check_grad_overflow is True
    before = [p.detach().clone() for p in engine.module.parameters()]
    backward(engine)
    engine.step()
    backward(engine, float("nan"))
    engine.step()
    print("SKIPPED" if all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters())) else "STEPPED")
"""


def test_one_rank_settings_are_generated_only_for_one_cpu_rank():
    def zero(stage: int, world: int, device: str = "cpu", extra=None) -> dict:
        return build_deepspeed_config(
            TrainConfig(zero_stage=stage), OptimConfig(), world, extra, device_type=device
        )["zero_optimization"]

    assert zero(1, 1)["contiguous_gradients"] is False and zero(2, 1)["contiguous_gradients"] is False
    assert zero(2, 2)["contiguous_gradients"] is True  # several ranks reduce from the flat buffer
    assert zero(3, 1)["contiguous_gradients"] is True
    assert zero(2, 1, "cuda")["contiguous_gradients"] is True
    # the deepspeed: block still decides
    assert (
        zero(2, 1, extra={"zero_optimization": {"contiguous_gradients": True}})["contiguous_gradients"]
        is True
    )


def test_the_bf16_nan_scan_is_kept_only_for_runs_that_skip_steps():
    def scan(precision: str, skips_steps: bool, extra=None) -> object:
        built = build_deepspeed_config(
            TrainConfig(precision=precision), OptimConfig(), 1, extra, skips_steps=skips_steps
        )
        return built["bf16"].get("check_grad_overflow", "default")

    assert scan("bf16", skips_steps=False) is False
    assert scan("bf16", skips_steps=True) == "default"  # DeepSpeed's own default: on
    assert scan("fp32", skips_steps=False) == "default"
    assert (
        scan("bf16", False, {"bf16": {"check_grad_overflow": True}}) is True
    )  # the deepspeed: block decides
    assert not Config().skips_steps
    assert Config(train=TrainConfig(on_nonfinite="skip")).skips_steps
    for action, skips in (("warn", False), ("skip", True), ("rollback", True)):
        assert Config(guard=GuardConfig(action=action)).skips_steps is skips


def test_the_plain_optimizer_is_clipped_by_the_loop_not_by_deepspeed():
    assert (
        build_deepspeed_config(TrainConfig(zero_stage=0, precision="fp32"), OptimConfig(), 1)[
            "gradient_clipping"
        ]
        == 0
    )
    for stage, precision in ((0, "bf16"), (1, "fp32"), (2, "fp32")):
        built = build_deepspeed_config(TrainConfig(zero_stage=stage, precision=precision), OptimConfig(), 1)
        assert built["gradient_clipping"] == OptimConfig().grad_clip


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (2, "bf16")])
def test_one_rank_engine_trains_bitwise_as_deepspeed_defaults(stage, precision):
    """Three real DeepSpeed steps with our one-rank settings and with DeepSpeed's defaults: the same parameters.
    In bf16 at ZeRO 2 a run that skips steps keeps DeepSpeed's NaN scan, which drops a step with a NaN gradient."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD.format(repo=str(REPO), tiny=str(TINY), stage=stage, precision=precision),
        ],
        env=make_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()
    assert "EQUAL" in printed, proc.stdout[-2000:]
    if (stage, precision) == (2, "bf16"):
        assert printed[-1] == "SKIPPED", proc.stdout[-2000:]
