"""train.deepspeed_config: the DeepSpeed JSON built from the typed config, and its validation."""

from __future__ import annotations

import os

import pytest

from train.config import TrainConfig
from train.deepspeed_config import build_deepspeed_config, validate_deepspeed_config
from train.errors import TrainError
from train.optim_config import OptimConfig


def test_deepspeed_config_from_typed_config_and_passthrough():
    train = TrainConfig(zero_stage=3, precision="fp16", micro_batch_size=4, grad_accum_steps=3)
    optim = OptimConfig(grad_clip=0.5)
    ds = build_deepspeed_config(
        train, optim, 2, {"zero_optimization": {"reduce_bucket_size": 1000}, "comms_logger": {}}
    )
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}  # deep-merged, stage kept
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert "comms_logger" in ds and "optimizer" not in ds and "scheduler" not in ds
    with pytest.raises(TrainError, match=r"'zero_optimization.stage'.*train.zero_stage"):
        build_deepspeed_config(train, optim, 2, {"zero_optimization": {"stage": 1}})
    with pytest.raises(TrainError, match=r"'scheduler'.*schedule.name"):
        build_deepspeed_config(train, optim, 2, {"scheduler": {"type": "WarmupLR"}})


def test_muon_is_built_by_deepspeed_from_the_typed_keys():
    train = TrainConfig()
    optim = OptimConfig(name="muon", lr=2e-3, muon_lr=0.05, muon_momentum=0.9, weight_decay=0.2, beta2=0.99)
    optimizer = build_deepspeed_config(train, optim, 1)["optimizer"]
    assert optimizer["type"] == "muon"
    params = optimizer["params"]
    assert (params["muon_lr"], params["adam_lr"], params["momentum"], params["weight_decay"]) == (
        0.05,
        2e-3,
        0.9,
        0.2,
    )
    assert params["betas"] == [0.9, 0.99] and params["torch_adam"] and params["ns_method"] == "standard"
    with pytest.raises(TrainError, match=r"'optimizer'.*optim.name"):
        build_deepspeed_config(train, optim, 1, {"optimizer": {"type": "Adam"}})
    assert (
        "reduce_scatter" not in build_deepspeed_config(train, optim, 1)["zero_optimization"]
    )  # ZeRO 2 keeps it
    train = TrainConfig(zero_stage=3)
    assert build_deepspeed_config(train, optim, 2)["zero_optimization"]["reduce_scatter"] is False
    with pytest.raises(TrainError, match=r"reduce_scatter: true.*needs it false"):
        build_deepspeed_config(train, optim, 2, {"zero_optimization": {"reduce_scatter": True}})


def test_deepspeed_validation_error_is_one_clear_paragraph():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    extra = {"zero_optimization": {"reduce_bucket_sise": 1000}}
    ds = build_deepspeed_config(TrainConfig(), OptimConfig(), 1, extra)
    with pytest.raises(TrainError) as err:
        validate_deepspeed_config(ds, extra)
    message = str(err.value)
    assert "reduce_bucket_sise" in message and "deepspeed: block" in message and "\n" not in message
    validate_deepspeed_config(
        build_deepspeed_config(TrainConfig(), OptimConfig(), 1, None), None
    )  # the generated one is valid


def test_unknown_top_level_deepspeed_key_is_refused_naming_it():
    """DeepSpeed ignores a top-level key it does not read; the config names it instead (issue 21)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    extra = {"zero_optimisation": {"stage": 1}, "comms_logger": {"enabled": False}}
    ds = build_deepspeed_config(TrainConfig(), OptimConfig(), 1, extra)
    with pytest.raises(TrainError, match=r"'zero_optimisation'.*Did you mean 'zero_optimization'") as err:
        validate_deepspeed_config(ds, extra)
    assert "\n" not in str(err.value)
    known = {"comms_logger": {"enabled": False}, "activation_checkpointing": {}, "wandb": {"enabled": False}}
    validate_deepspeed_config(build_deepspeed_config(TrainConfig(), OptimConfig(), 1, known), known)
