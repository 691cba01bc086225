"""train.startup / train.deepspeed_config: on one process the engine skips DeepSpeed work that is the identity there
(ZeRO 0's gradient all-reduce; on CPU ZeRO 1-2's contiguous gradient copies) and trains bitwise as DeepSpeed's defaults do."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY
from tests.helpers import test_env as make_env
from train.config import TrainConfig
from train.deepspeed_config import build_deepspeed_config
from train.optim_config import OptimConfig

CHILD = """
import sys
sys.path.insert(0, {repo!r})
import torch
from launch.config import load_config
from train.batch import batch_loss
from train.distributed import setup_distributed
from train.plan import plan_run
from train.startup import build_engine

stage = {stage}
overrides = [f"train.zero_stage={{stage}}", "train.precision=fp32", "model.n_layers=2", "model.d_model=64",
             "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128", "model.max_seq_len=32",
             "model.vocab_size=512", "train.micro_batch_size=4", "train.grad_accum_steps=2"]
dist_info = setup_distributed(load_config({tiny!r}, overrides).train)
results = []
for deepspeed_defaults in (False, True):
    extra = ["deepspeed={{zero_optimization: {{contiguous_gradients: true}}}}"] if deepspeed_defaults and stage else []
    cfg = load_config({tiny!r}, overrides + extra)
    engine = build_engine(cfg, plan_run(cfg, 1), dist_info, None, universal=False)
    if stage == 0:
        assert engine.enable_backward_allreduce is False  # build_engine turns it off on one rank
        engine.enable_backward_allreduce = deepspeed_defaults
    else:
        assert engine.optimizer.contiguous_gradients is deepspeed_defaults
    torch.manual_seed(5)
    for _ in range(6):  # 3 optimizer steps of 2 micro-batches
        tokens = torch.randint(0, 512, (4, 33))
        engine.backward(batch_loss(engine, {{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}}))
        engine.step()
    results.append([p.detach().clone() for p in engine.module.parameters()])
print("EQUAL" if all(torch.equal(a, b) for a, b in zip(*results)) else "DIFFERENT")
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


@pytest.mark.parametrize("stage", [0, 2])
def test_one_rank_engine_trains_bitwise_as_deepspeed_defaults(stage):
    """Three real DeepSpeed steps with our one-rank settings and with DeepSpeed's defaults: the same parameters."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), tiny=str(TINY), stage=stage)],
        env=make_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "EQUAL", proc.stdout[-2000:]
