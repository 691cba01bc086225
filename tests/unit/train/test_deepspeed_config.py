"""train.deepspeed_config: the DeepSpeed JSON built from the typed config, and its validation."""

from __future__ import annotations

import os

import pytest

from launch.config import load_config
from tests.helpers import REPO
from train.config import TrainConfig
from train.deepspeed_config import (
    BUCKET_FLOOR,
    build_deepspeed_config,
    keys_read,
    validate_deepspeed_config,
)
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
    # deep-merged over the generated keys, stage kept (no model given: no generated bucket sizes)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 1000,
    }
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


def parsed_zero(ds: dict):
    """zero_optimization as DeepSpeed itself reads it (a misspelt key would leave its default here)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(dict(ds)).zero_config


def test_communication_options_are_sized_from_the_model_and_overlap_only_on_cuda():
    """The config the trainer builds for cuda and for cpu (no GPU needed: only the dict and DeepSpeed's parse)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = load_config(str(REPO / "configs" / "125m.yaml")).model
    layer = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768  # q, k, v, o + SwiGLU + 2 norms: 7,079,424
    bucket = -(-layer // 8) * 8
    assert bucket > BUCKET_FLOOR
    built = {
        (stage, device): build_deepspeed_config(
            TrainConfig(zero_stage=stage, precision="bf16", grad_accum_steps=4),
            OptimConfig(),
            1,  # DeepSpeed's parse checks the batch against this process's world size
            model=model,
            device_type=device,
        )
        for stage in (0, 1, 2, 3)
        for device in ("cuda", "cpu")
    }
    for stage in (2, 3):
        assert parsed_zero(built[stage, "cuda"]).overlap_comm is True
        assert parsed_zero(built[stage, "cpu"]).overlap_comm is False  # CUDA streams only
        assert parsed_zero(built[stage, "cuda"]).contiguous_gradients is True
    for stage in (1, 2, 3):
        zero = parsed_zero(built[stage, "cuda"])
        assert zero.reduce_bucket_size == bucket  # one layer, not DeepSpeed's 5e8
    for stage in (1, 2):
        assert parsed_zero(built[stage, "cuda"]).allgather_bucket_size == bucket
    zero3 = parsed_zero(built[3, "cuda"])
    assert zero3.prefetch_bucket_size == bucket and zero3.param_persistence_threshold == 7680
    assert built[0, "cuda"]["zero_optimization"] == {"stage": 0}
    # A small model's bucket stops at the floor; the user's deepspeed: keys still win.
    tiny = load_config(str(REPO / "configs" / "tiny.yaml")).model
    user = {"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 5e8}}
    mine = build_deepspeed_config(TrainConfig(), OptimConfig(), 1, user, model=tiny, device_type="cuda")
    assert mine["zero_optimization"]["allgather_bucket_size"] == BUCKET_FLOOR
    assert (parsed_zero(mine).overlap_comm, parsed_zero(mine).reduce_bucket_size) == (False, 5e8)


def test_zero1_bf16_accumulates_in_fp32_and_the_user_can_say_otherwise():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    zero1 = TrainConfig(zero_stage=1, precision="bf16", grad_accum_steps=2)
    ds = build_deepspeed_config(zero1, OptimConfig(), 1)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and "data_types" in keys_read(ds)
    for other in (
        TrainConfig(zero_stage=2, precision="bf16"),
        TrainConfig(zero_stage=1, precision="fp32"),
        TrainConfig(zero_stage=1, precision="fp16"),
    ):
        assert "data_types" not in build_deepspeed_config(other, OptimConfig(), 2)
    user = {"data_types": {"grad_accum_dtype": "bf16"}}
    assert build_deepspeed_config(zero1, OptimConfig(), 2, user)["data_types"] == user["data_types"]
