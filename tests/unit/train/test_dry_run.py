"""`slm train --dry-run --world-size N`: the partitions DeepSpeed really makes at N for the 125m preset, the errors
that only show at N (each a clear sentence, all of them collected), that a dry run leaves run.dir alone, and that
one taking no step skips the parameters' random init (RandomInitSkipped).

Every dry run here runs in a child process: the fake process group and DeepSpeed's globals must not outlive it.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from typing import Dict, List

import numpy as np
import pytest
import torch

from launch.config import load_config
from tests.helpers import REPO, TINY, run, slm_cmd, test_env

PRESET_125M = str(REPO / "configs" / "125m.yaml")
WORLD_SIZES = (8, 64, 512)
STAGES = (1, 2, 3)
ALIGNMENT = 2
"""ZeRO 1-2 pad each flat param group to a multiple of 2 x N elements (4-byte alignment of 16-bit elements)."""

PARTITIONS_SCRIPT = """
import json, sys
from launch.config import load_config
from train.dry_run import DryRunOptions, dry_run
out = {}
for stage in (1, 2, 3):
    cfg = load_config(sys.argv[1], [f"train.zero_stage={stage}", "run.dir=" + sys.argv[2], "data.dir=" + sys.argv[3]])
    for n in (8, 64, 512):
        report = dry_run(cfg, DryRunOptions(world_size=n, rank=n - 1, steps=0))
        assert not report.errors, report.errors
        out[f"{stage}/{n}"] = report.partitions
print(json.dumps(out))
"""


def shapes_125m() -> Dict[str, List[int]]:
    """Element counts of every 125m parameter, from the preset's shape alone: decayed matrices, the rest."""
    m = load_config(PRESET_125M).model
    d, q, kv, f = m.d_model, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.ffn_hidden_size
    matrices = [q * d, kv * d, kv * d, d * q, f * d, f * d, d * f] * m.n_layers
    assert m.tie_embeddings
    others = [m.vocab_size * d] + [d] * (2 * m.n_layers + 1)  # the (tied) embedding, the norms
    return {"decay": matrices, "no_decay": others}


def expected(stage: int, n: int) -> Dict[str, int]:
    """What DeepSpeed should hold on one rank: ZeRO 1-2 cut each padded flat group into N equal parts; ZeRO 3
    partitions every parameter on its own, ceil(numel / N) each."""
    groups = shapes_125m()
    if stage == 3:
        part = sum(math.ceil(numel / n) for g in groups.values() for numel in g)
        return {"params": part, "params_partition": part, "grads": part, "master": part}
    padded = [math.ceil(sum(g) / (ALIGNMENT * n)) * ALIGNMENT * n for g in groups.values()]
    part = sum(p // n for p in padded)
    return {
        "params": sum(padded),  # ZeRO 1-2 keep every weight
        "params_partition": part,
        "grads": part if stage == 2 else sum(padded),
        "master": part,
    }


@pytest.fixture(scope="module")
def partitions_125m(tmp_path_factory) -> Dict[str, Dict[str, int]]:
    """The dry run of 125m at ZeRO 1-3 x N = 8, 64, 512 (no step, so the parameters are not initialised: the
    partitions must still be the preset's), all nine in one child process.

    About 8-12 s on 2 busy cores (18-35 s when the parameters were still initialised): nine DeepSpeed
    initialisations of a 124M-parameter model, the point of the test."""
    tmp = tmp_path_factory.mktemp("dry125m")
    proc = run(
        [sys.executable, "-c", PARTITIONS_SCRIPT, PRESET_125M, str(tmp / "run"), str(tmp / "no-data")],
        timeout=900,
    )
    assert not (tmp / "run").exists(), "a dry run must not create run.dir"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_125m_partitions_are_deepspeeds(partitions_125m, stage, n):
    measured = partitions_125m[f"{stage}/{n}"]
    assert {k: measured[k] for k in ("params", "params_partition", "grads", "master")} == expected(stage, n)
    assert measured["optimizer_state"] == 0  # no step: Adam's state does not exist yet
    # The preset is bf16: ZeRO-1 accumulates in fp32 (DeepSpeed's BF16_Optimizer), ZeRO 2-3 in bf16.
    assert measured["grad_bytes"] == (4 if stage == 1 else 2)
    total = sum(sum(g) for g in shapes_125m().values())
    assert total == 123_587_328  # the preset's count (README, slm model summary)


def test_dry_run_takes_a_step_reads_this_ranks_data_and_leaves_run_dir_alone(tmp_path, tiny_data_dir):
    """A dry run with a real step on the prepared tiny data (30-60 s on 2 busy cores: DeepSpeed start-up, one step)."""
    run_dir, scratch = tmp_path / "run", tmp_path / "tmp"
    run_dir.mkdir()
    scratch.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    proc = run(
        slm_cmd(
            [
                "train",
                TINY,
                "--dry-run",
                "--world-size",
                "4",
                "--rank",
                "1",
                "--gpu",
                "h100",
                "train.precision=fp32",
                f"run.dir={run_dir}",
                f"data.dir={tiny_data_dir}",
            ]
        ),
        env=test_env({"TMPDIR": str(scratch)}),
    )
    out = proc.stdout
    assert "global batch 32 = micro 8 x accum 1 x world 4; 4,096 tokens per step" in out
    assert (
        "rank 1 reads samples [8, 16) of each" in out
        and "rank 1's first micro-batch reads tinyshakespeare-train-" in out
    )
    assert "1 real step(s) on rank 1's batches of" in out
    loss = float(re.search(r"step 1: loss (\S+) ", out).group(1))
    assert abs(loss - math.log(4096)) < 1, out  # a step from the initialised weights: about ln(vocab)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in out and "no errors found" in out
    # the DeepSpeed config the GPUs would get, though this dry run initialised DeepSpeed on the CPU
    assert 'zero_optimization {"stage": 2, "overlap_comm": true, "contiguous_gradients": true' in out
    assert "optimizer state" in out and "created by the first step" not in out  # the step made Adam's state
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before, "run.dir was touched"
    assert not list(scratch.glob("slm-dry-run-*")), "the scratch checkpoint must be removed"


@pytest.fixture
def global_rngs():
    """Put back the random, numpy and torch generators that seeded_model seeds."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def test_random_init_skipped_leaves_tensors_untouched():
    """Every init the model's modules run (nn.Linear, nn.Embedding, Transformer.reset_parameters) and the nn.init
    fills leave a sentinel in place under RandomInitSkipped, and run again once it is left."""
    from model import Transformer
    from train.dry_run import RandomInitSkipped
    from train.plan import plan_run

    cfg = load_config(TINY)
    model = Transformer(plan_run(cfg, 1).model(cfg.model))
    tensor = torch.full((8, 8), 7.0)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(7.0)
    with RandomInitSkipped():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for init in (
            torch.nn.init.normal_,
            torch.nn.init.uniform_,
            torch.nn.init.zeros_,
            torch.nn.init.ones_,
            torch.nn.init.kaiming_uniform_,
            torch.nn.init.kaiming_normal_,
            torch.nn.init.xavier_normal_,
        ):
            assert init(tensor) is tensor
        assert torch.nn.init.constant_(tensor=tensor, val=3.0) is tensor
    assert all(bool((p == 7.0).all()) for p in model.parameters())
    assert bool((tensor == 7.0).all())
    assert bool((torch.nn.init.normal_(tensor) != 7.0).all())  # outside the mode, init runs


def test_dry_run_model_is_initialised_only_when_the_dry_run_steps(global_rngs):
    """steps=0: the model has the run's parameter shapes and dtypes, and its build drew no random number (the torch
    generator is where the seed left it); steps=1: the weights `slm train` starts from."""
    from train.dry_run import dry_run_model
    from train.plan import plan_run
    from train.startup import seeded_model

    cfg = load_config(TINY)
    plan = plan_run(cfg, 1)
    trained = dict(seeded_model(cfg, plan, None).named_parameters())
    torch.manual_seed(cfg.run.seed)
    seeded = torch.get_rng_state()

    skipped = dict(dry_run_model(cfg, plan, steps=0).named_parameters())
    assert torch.equal(torch.get_rng_state(), seeded)
    assert {k: (p.shape, p.dtype) for k, p in skipped.items()} == {
        k: (p.shape, p.dtype) for k, p in trained.items()
    }

    stepping = dict(dry_run_model(cfg, plan, steps=1).named_parameters())
    assert not torch.equal(torch.get_rng_state(), seeded)
    assert stepping.keys() == trained.keys()
    assert all(torch.equal(stepping[k], trained[k]) for k in trained)


def test_errors_at_n_are_all_reported(tmp_path, tiny_data_dir):
    """Every error that shows only at N, in one dry run (steps 0; 20-40 s of DeepSpeed start-up on 2 busy cores)."""
    proc = run(
        slm_cmd(
            [
                "train",
                TINY,
                "--dry-run",
                "--world-size",
                "8",
                "--steps",
                "0",
                "--gpu",
                "l4",
                "--nodes",
                "3",
                "--tasks-per-node",
                "2",
                "train.precision=fp32",
                "train.micro_batch_size=16384",
                "train.activation_checkpointing=false",  # auto would recompute its way under the l4
                "train.global_batch_size=100",
                "eval.batches=8",
                "deepspeed={zero_optimization: {allgather_bucket_size: 3}}",
                f"run.dir={tmp_path / 'run'}",
                f"data.dir={tiny_data_dir}",
            ]
        ),
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("  error: ")]
    assert len(errors) == 6, out
    assert "6 error(s) at this world size" in out
    assert any(
        "train.global_batch_size is 100" in e
        and "100 is not divisible by world size 8 x micro_batch_size 16384" in e
        for e in errors
    )
    assert any("--nodes 3 x --tasks-per-node 2 = 6 ranks, but --world-size is 8" in e for e in errors)
    assert any("only 22.5 GiB is available (one l4)" in e for e in errors)
    assert any("train windows" in e and "global batch of 131,072" in e for e in errors)
    assert any("validation windows" in e and "8 ranks x micro 16384" in e for e in errors)
    assert any(
        "DeepSpeed could not initialise ZeRO 2 at world size 8: AssertionError: allgather_bucket_size must be"
        in e
        for e in errors
    )
    assert not (tmp_path / "run").exists()


def test_dry_run_reports_the_gradient_reduction_and_whether_zero1_fits():
    """In-process and config-level (no DeepSpeed engine): ZeRO-1 in bf16 accumulates in fp32; ZeRO-2 with
    accumulation reduces every micro-batch, and the dry run says when ZeRO-1's states would fit the --gpu."""
    from train.dry_run import DryRunOptions, DryRunReport, target_deepspeed
    from train.plan import plan_run

    def lines(overrides: List[str], gpu: str) -> List[str]:
        cfg = load_config(PRESET_125M, overrides)
        report = DryRunReport()
        out = target_deepspeed(cfg, plan_run(cfg, 8), DryRunOptions(world_size=8, gpu=gpu), report)
        assert not report.errors
        return out

    zero1 = lines([], "h100")
    assert '"stage": 1' in zero1[0] and '"overlap_comm"' not in zero1[0]
    assert "accumulate in fp32 (BF16_Optimizer) and are all-reduced once per step" in zero1[1]
    zero2 = lines(["train.zero_stage=2"], "h100")
    assert '"overlap_comm": true' in zero2[0]
    assert "reduce-scatters the gradients after each of the 8 micro-batches" in zero2[1]
    assert "train.zero_stage=1 would fit (4.12 GiB of 79.65 GiB estimated)" in zero2[2]
    big = ["train.zero_stage=2", "train.micro_batch_size=64", "train.activation_checkpointing=false"]
    assert len(lines(big, "l4")) == 2  # ZeRO-1 would not fit a 24 GB card: no such hint


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--world-size", "0"], "--world-size is 0"),
        (["--world-size", "4", "--rank", "4"], "--rank is 4; expected a rank of the job, 0 to 3"),
        (["--world-size", "4", "--gpu", "h900"], "--gpu 'h900' is not a GPU the dry run knows"),
        ([], "needs --world-size N"),
    ],
)
def test_bad_flags_are_refused_plainly(tmp_path, capsys, args, needle):
    from launch.cli import main

    code = main(["train", TINY, "--dry-run", *args, f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_world_size_without_dry_run_is_refused(tmp_path, capsys):
    from launch.cli import main

    code = main(["train", TINY, "--world-size", "8", f"run.dir={tmp_path / 'run'}"])
    assert code == 2 and "need --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
