"""The trainer's parts in-process: optimizer groups, DeepSpeed config, batch arithmetic, preflight,
checkpoint folders and compatibility, evaluation maths, signals, the non-finite watch."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from launch.config import load_config, to_dict
from model import ModelConfig, Transformer
from tests.helpers import TINY
from train.checkpoint import COMPLETE, find_checkpoint, prune_checkpoints, read_meta
from train.config import TrainConfig
from train.deepspeed_config import build_deepspeed_config, validate_deepspeed_config
from train.distributed import DistInfo
from train.errors import TrainError
from train.evaluate import bits_per_byte
from train.loop import NonfiniteWatch
from train.metrics import rewind_metrics
from train.optim import build_optimizer, param_groups, split_decay
from train.preflight import check_memory, plan_batches, preflight
from train.resume import check_resumable, differences, load_mode, resolve_resume
from train.signals import EXIT_PREEMPTED, StopRequest

SMALL = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=256, max_seq_len=16)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_only_on_attention_and_mlp_matrices(tie):
    model = Transformer(ModelConfig(**{**SMALL.__dict__, "tie_embeddings": tie}))
    decay, no_decay = split_decay(model)
    assert decay and all(".self_attn." in n or ".mlp." in n for n in decay)
    assert all(n.endswith("_proj.weight") for n in decay)
    assert len(decay) == SMALL.n_layers * 7  # q, k, v, o, gate, up, down
    assert "embed_tokens.weight" in no_decay and "norm.weight" in no_decay
    assert all("norm" in n or n.startswith(("embed_tokens", "lm_head")) for n in no_decay)
    assert ("lm_head.weight" in no_decay) == (not tie)  # a tied head is the embedding, listed once
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, beta1=0.8, beta2=0.9, adam_eps=1e-6))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[1]["weight_decay"] == 0.0


def test_decay_leaves_norms_and_embeddings_untouched():
    """With zero gradients, one AdamW step changes only the decayed matrices (decoupled decay)."""
    model = Transformer(SMALL)
    optimizer = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decay, no_decay = split_decay(model)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before[n]) for n in no_decay)
    assert all(torch.allclose(params[n], before[n] * (1 - 0.1 * 0.5)) for n in decay)


def test_deepspeed_config_from_typed_config_and_passthrough():
    train = TrainConfig(zero_stage=3, precision="fp16", micro_batch_size=4, grad_accum_steps=3, grad_clip=0.5)
    ds = build_deepspeed_config(train, 2, {"zero_optimization": {"reduce_bucket_size": 1000}, "comms_logger": {}})
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}  # deep-merged, stage kept
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert "comms_logger" in ds and "optimizer" not in ds and "scheduler" not in ds
    with pytest.raises(TrainError, match=r"'zero_optimization.stage'.*train.zero_stage"):
        build_deepspeed_config(train, 2, {"zero_optimization": {"stage": 1}})
    with pytest.raises(TrainError, match=r"'scheduler'.*train.schedule"):
        build_deepspeed_config(train, 2, {"scheduler": {"type": "WarmupLR"}})


def test_deepspeed_validation_error_is_one_clear_paragraph():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    extra = {"zero_optimization": {"reduce_bucket_sise": 1000}}
    ds = build_deepspeed_config(TrainConfig(), 1, extra)
    with pytest.raises(TrainError) as err:
        validate_deepspeed_config(ds, extra)
    message = str(err.value)
    assert "reduce_bucket_sise" in message and "deepspeed: block" in message and "\n" not in message
    validate_deepspeed_config(build_deepspeed_config(TrainConfig(), 1, None), None)  # the generated one is valid


def test_batch_arithmetic_and_global_batch_check():
    plan = plan_batches(TrainConfig(micro_batch_size=4, grad_accum_steps=2, max_steps=7), world_size=2, seq_len=32)
    assert (plan.global_batch_size, plan.tokens_per_step, plan.max_steps) == (16, 512, 7)
    budget = plan_batches(TrainConfig(micro_batch_size=4, grad_accum_steps=2, max_tokens=5000), 2, 32)
    assert budget.max_steps == math.ceil(5000 / 512)
    with pytest.raises(TrainError) as err:
        plan_batches(TrainConfig(micro_batch_size=4, grad_accum_steps=2, global_batch_size=64), 2, 32)
    message = str(err.value)
    assert "train.global_batch_size is 64" in message and "= 16" in message and "world size 2" in message


def _cpu_rank(world_size: int = 1) -> DistInfo:
    return DistInfo(rank=0, world_size=world_size, local_rank=0, local_world_size=world_size,
                    device=torch.device("cpu"), backend="gloo")


def test_preflight_refuses_what_cannot_fit_without_allocating():
    cfg = load_config(str(Path(TINY).parent / "1b.yaml"), ["train.micro_batch_size=64"])
    train = cfg.train
    plan = plan_batches(train, 1, cfg.model.max_seq_len)
    with pytest.raises(TrainError) as err:
        preflight(cfg.model, train, plan, _cpu_rank())
    message = str(err.value)
    assert "estimated training memory per rank" in message and "GiB" in message
    assert "train.zero_stage" in message and "train.micro_batch_size" in message
    tiny = load_config(TINY, [])
    lines = preflight(tiny.model, tiny.train, plan_batches(tiny.train, 1, tiny.model.max_seq_len), _cpu_rank())
    assert any("global batch 8" in line and "tokens per step" in line for line in lines)
    assert any("memory per rank" in line for line in lines)
    check_memory(10.0, None, "unknown", train, 1)  # an unknown budget never refuses
    with pytest.raises(TrainError, match="1.0 GiB is available"):
        check_memory(2 * 1024**3, 1024**3, "test", train, 1)


def test_bits_per_byte():
    assert bits_per_byte(math.log(2) * 3.0, 1.5) == pytest.approx(2.0)
    assert bits_per_byte(2.0, None) is None and bits_per_byte(float("nan"), 3.0) is None


def _fake_step(ckpt_dir: Path, step: int, complete: bool = True) -> Path:
    folder = ckpt_dir / f"step_{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / COMPLETE).write_text("x")
    return folder


def test_find_checkpoint_ignores_incomplete_and_temporary_folders(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    assert find_checkpoint(run) is None and find_checkpoint(tmp_path / "missing") is None
    _fake_step(ckpt, 2)
    newest = _fake_step(ckpt, 4)
    _fake_step(ckpt, 6, complete=False)
    (ckpt / "tmp.step_00000008").mkdir()
    assert find_checkpoint(run) == newest
    assert find_checkpoint(ckpt) == newest
    assert find_checkpoint(newest) == newest
    assert find_checkpoint(ckpt / "step_00000006") is None
    removed = prune_checkpoints(ckpt, keep=1)
    assert not (ckpt / "step_00000002").exists() and not (ckpt / "tmp.step_00000008").exists()
    assert newest.exists() and len(removed) == 2


def test_meta_and_compatibility_report_what_differs(tmp_path):
    cfg = to_dict(load_config(TINY, []))
    meta = {"step": 4, "tokens_seen": 10, "config": cfg, "tokenizer_sha256": "a" * 64, "manifest_sha256": "b" * 64,
            "world_size": 2, "zero_stage": 2}
    folder = _fake_step(tmp_path / "checkpoints", 4)
    with pytest.raises(TrainError, match="no meta.json"):
        read_meta(folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    assert read_meta(folder)["step"] == 4
    assert differences(meta, cfg, "a" * 64, "b" * 64, world_size=2) == []
    other = json.loads(json.dumps(cfg))
    other["model"]["d_model"] = 256
    other["train"]["precision"] = "fp32"
    found = differences(meta, other, "c" * 64, "d" * 64, world_size=2)
    assert any("model.d_model is 128 in the checkpoint but 256" in f for f in found)
    assert any("tokenizer differs" in f for f in found) and any("manifest differs" in f for f in found)
    assert any("train.precision" in f for f in found)
    with pytest.raises(TrainError) as err:
        check_resumable(folder, meta, other, "c" * 64, "d" * 64, 2)
    assert str(err.value).startswith(f"Refusing to resume from checkpoint '{folder}'")
    assert load_mode(meta, 2, 2) == "plain" and load_mode(meta, 1, 2) == "universal" and load_mode(meta, 4, 3) == "universal"
    assert load_mode({**meta, "zero_stage": 0}, 1, 0) == "plain"
    assert load_mode(meta, 2, 0) == "refuse"
    zero_switch = json.loads(json.dumps(cfg))
    zero_switch["train"]["zero_stage"] = 0
    assert any("DeepSpeed cannot convert" in f for f in differences(meta, zero_switch, "a" * 64, "b" * 64, 2))


def test_resume_setting_and_metrics_rewind(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume("auto", run) is None and resolve_resume("false", run) is None
    newest = _fake_step(run / "checkpoints", 3)
    assert resolve_resume("auto", run) == newest and resolve_resume(str(newest), tmp_path / "elsewhere") == newest
    with pytest.raises(TrainError, match="train.resume is false"):
        resolve_resume("False", run)
    with pytest.raises(TrainError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "nothing"), run)
    rows = [{"step": s, "loss": 1.0} for s in range(1, 6)] + [{"step": 4, "val_loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    rewind_metrics(run, 3)
    kept = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3]


def test_stop_request_catches_sigterm_and_sigusr1():
    assert EXIT_PREEMPTED == 3
    previous = signal.getsignal(signal.SIGUSR1)
    request = StopRequest().install()
    try:
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.requested and request.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing, and does not kill us
        assert request.signal_name == "SIGUSR1"
    finally:
        request.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_nonfinite_watch_sees_a_nan_gradient_with_a_finite_loss():
    torch.manual_seed(0)
    model = Transformer(SMALL)
    watch = NonfiniteWatch(model, enabled=True)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 8))
    _, loss = model(tokens, targets=tokens)
    loss.backward()
    assert watch.nonfinite(loss.detach()).item() == 0.0
    assert watch.nonfinite(torch.tensor(float("inf"))).item() == 1.0
    # A NaN only in one parameter's gradient (a hook registered before the watch's): the loss stays finite.
    broken = Transformer(SMALL)
    broken.norm.weight.register_hook(lambda g: g * float("nan"))
    watch = NonfiniteWatch(broken, enabled=True)
    _, loss = broken(tokens, targets=tokens)
    loss.backward()
    assert torch.isfinite(loss) and watch.nonfinite(loss.detach()).item() == 1.0
    assert watch.nonfinite(loss.detach()).item() == 0.0  # each call starts afresh
    assert NonfiniteWatch(model, enabled=False).handles == []
