"""Real `slm train` runs (plain process and torchrun, gloo on CPU) on the tiny preset shrunk further.

Runs are shared through fixtures: the 2-process run of each ZeRO stage is also the reference curve and
the checkpoint source for the resume tests, and the 1-process run (single_run, built once per run in
tests/integration/conftest.py) is the reference for the interrupted (SIGTERM, kill -9) runs, whose losses must
match it bitwise.
Fault-injection hooks (common.faults): SLM_SLEEP_IN_SAVE and SLM_INJECT_NAN_AT_STEP.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers import TINY, run, slm_cmd
from tests.helpers import test_env as make_env
from tests.integration.conftest import STAGE_EXTRAS
from tests.runs import ONE_PROC, SHRINK, STEPS, losses, read_until, rows, start, train_args
from train.checkpoint import find_checkpoint, read_record

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_on_two_processes_learns(two_proc_run, stage):
    """10-30 s on 2 busy cores where this test builds the stage's shared 2-process run (a torchrun start-up and 12
    steps); the resume tests and test_s3_checkpoints.py reuse it."""
    run_dir = two_proc_run(stage)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.3, curve
    evals = rows(run_dir, "eval")
    assert [r["step"] for r in evals] == [6, 12] and evals[1]["val_loss"] < evals[0]["val_loss"]
    record = read_record(find_checkpoint(run_dir))
    assert (record.step, record.world_size, record.zero_stage) == (STEPS, 2, stage)
    assert (run_dir / "DONE").is_file()
    if stage == 1:  # bf16 + accumulation 2: DeepSpeed's BF16_Optimizer, gradients accumulated in fp32
        names = sorted(p.name for p in find_checkpoint(run_dir).glob("*_optim_states.pt"))
        assert names == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], names
    if stage == 0:
        assert "manifest.json not found: preparing the data now" in two_proc_run.outputs[0]
        assert (two_proc_run.data_dir(0) / "manifest.json").is_file()


def test_zero2_two_processes_follow_the_one_process_curve(two_proc_run, single_run):
    two, one = losses(two_proc_run(2)), losses(single_run)
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), (step, one, two)
    # eval.batches counts over all ranks, so both evaluate the same validation samples.
    val_two = {r["step"]: r["val_loss"] for r in rows(two_proc_run(2), "eval")}
    val_one = {r["step"]: r["val_loss"] for r in rows(single_run, "eval")}
    assert sorted(val_two) == sorted(val_one) and val_one
    for step in val_one:
        assert val_two[step] == pytest.approx(val_one[step], rel=1e-5, abs=1e-5), (step, val_one, val_two)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_two_process_resume_is_bitwise_exact(two_proc_run, tmp_path, stage):
    full = two_proc_run(stage)
    step6 = full / "checkpoints" / "step_00000006"
    resumed = tmp_path / "resumed"
    out = run(
        slm_cmd(
            train_args(
                resumed,
                two_proc_run.data_dir(stage),
                f"train.zero_stage={stage}",
                f"checkpoint.resume={step6}",
                *STAGE_EXTRAS.get(stage, []),
            ),
            nproc=2,
        )
    )
    assert "resumed from" in out.stderr and "at step 6" in out.stderr
    again, reference = losses(resumed), losses(full)
    assert sorted(again) == list(range(7, STEPS + 1))
    assert all(again[s] == reference[s] for s in again), (
        again,
        reference,
    )  # bitwise: floats from the same bits


def test_max_time_evaluates_checkpoints_and_stops_cleanly(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = run(slm_cmd(train_args(run_dir, tiny_data_dir, "train.max_time=0")))  # spent after the first step
    assert "train.max_time (0.0 s) spent: stopped cleanly after step 1" in out.stderr
    assert [r["step"] for r in rows(run_dir)] == [1] and [r["step"] for r in rows(run_dir, "eval")] == [1]
    assert read_record(find_checkpoint(run_dir)).step == 1
    assert not (run_dir / "DONE").exists()  # max_steps not reached: a requeued job continues


def test_metrics_config_and_checkpoint_layout(single_run):
    train_rows = rows(single_run)
    for row in train_rows:
        for key in (
            "step",
            "loss",
            "lr",
            "tokens",
            "grad_norm",
            "tokens_per_second",
            "step_ms",
            "data_wait",
            "skipped_steps",
            "time",
        ):
            assert key in row, (key, row)
        assert 0 < row["data_wait"] < 1  # next(train_iter) takes some of the step, never all of it
        assert row["tokens"] == row["step"] * 8 * 32 and row["grad_norm"] > 0 and row["skipped_steps"] == 0
    assert train_rows[0]["lr"] == pytest.approx(3e-3 / 2) and train_rows[1]["lr"] == pytest.approx(3e-3)
    assert train_rows[-1]["lr"] < train_rows[2]["lr"]
    for row in rows(single_run, "eval"):
        assert {"step", "val_loss", "val_ppl", "val_bpb", "tokens"} <= set(row)
        assert 0 < row["val_bpb"] < row["val_loss"] * 2 and row["val_ppl"] > 1
    assert "max_steps: 12" in (single_run / "config.yaml").read_text()
    assert (single_run / "DONE").is_file()
    ckpt_dir = single_run / "checkpoints"
    steps = sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000006", "step_00000012"]
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000012"
    newest = find_checkpoint(single_run)
    assert newest == ckpt_dir / "step_00000012"
    for name in ("COMPLETE", "meta.json", "tokenizer.json", "rng_rank00000.pt", "mp_rank_00_model_states.pt"):
        assert (newest / name).is_file(), name
    record = read_record(newest)
    assert record.tokens_seen == STEPS * 8 * 32 and record.config["model"]["d_model"] == 64
    assert len(record.tokenizer_sha256) == 64 and len(record.manifest_sha256) == 64
    # What the run derived is its plan, recorded beside the config (which stays as written) and in the checkpoint.
    plan = json.loads((single_run / "plan.json").read_text())
    assert (plan["max_steps"], plan["world_size"], plan["global_batch_size"]) == (STEPS, 1, 8)
    assert plan["tokens_per_step"] == 8 * 32 and plan["vocab_size"] > 0 and record.identity.plan == plan


def test_sigterm_checkpoints_exits_3_and_resumes_exactly(single_run, tiny_data_dir, tmp_path):
    """15-30 s on 2 busy cores: two `slm train` processes, the one stopped by SIGTERM and its resume to step 12."""
    run_dir = tmp_path / "run"
    cmd = slm_cmd(train_args(run_dir, tiny_data_dir, *ONE_PROC))
    proc, seen = start(cmd), []
    read_until(proc, "train step 2 ", seen)
    proc.send_signal(signal.SIGTERM)
    output = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, output
    assert "received SIGTERM" in output
    stopped = find_checkpoint(run_dir)
    assert stopped is not None, output
    stopped_at = read_record(stopped).step
    assert 2 <= stopped_at < STEPS and f"stopped by signal after step {stopped_at}" in output
    assert not (run_dir / "DONE").exists()
    resumed = run(cmd)
    assert f"at step {stopped_at} " in resumed.stderr
    assert losses(run_dir) == losses(single_run)  # every step, bitwise
    assert [r["step"] for r in rows(run_dir)] == list(range(1, STEPS + 1))  # no step logged twice
    assert (run_dir / "DONE").is_file()


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(single_run, tiny_data_dir, tmp_path):
    """15-30 s on 2 busy cores: two `slm train` processes, the one killed inside a save and its resume to step 12."""
    run_dir = tmp_path / "run"
    cmd = slm_cmd(train_args(run_dir, tiny_data_dir, *ONE_PROC, "checkpoint.every=2"))
    proc, seen = start(cmd, env=make_env({"SLM_SLEEP_IN_SAVE": "4:120"})), []
    read_until(proc, "sleeping 120 s inside the save of step_00000004", seen)
    proc.kill()  # SIGKILL
    proc.wait(timeout=60)
    ckpt_dir = run_dir / "checkpoints"
    assert (
        ckpt_dir / "tmp.step_00000004" / "mp_rank_00_model_states.pt"
    ).is_file()  # DeepSpeed had written it
    assert not (ckpt_dir / "step_00000004").exists()
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000002"
    assert find_checkpoint(run_dir) == ckpt_dir / "step_00000002"
    resumed = run(cmd)
    assert "at step 2" in resumed.stderr
    assert losses(run_dir) == losses(single_run)
    assert not (ckpt_dir / "tmp.step_00000004").exists()
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000012"


def test_injected_nan_stops_before_the_optimizer_step(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = run(
        slm_cmd(train_args(run_dir, tiny_data_dir, *ONE_PROC, "checkpoint.every=2")),
        env=make_env({"SLM_INJECT_NAN_AT_STEP": "3"}),
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Non-finite loss or gradient at step 3" in out.stderr and "before the optimizer step" in out.stderr
    assert "Traceback" not in out.stderr
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) == ["step_00000002"]
    assert [r["step"] for r in rows(run_dir)] == [1, 2]


def test_a_skipped_step_at_zero0_in_fp32_is_dropped_and_the_run_finishes(tiny_data_dir, tmp_path):
    """ZeRO 0 in fp32 (the CPU recipe's engine): the skip drops the step's gradients, which DeepSpeed's own clip
    could not take (IndexError); the loop clips that optimizer itself (train.deepspeed_config.plain_optimizer)."""
    run_dir = tmp_path / "run"
    out = run(
        slm_cmd(
            train_args(
                run_dir,
                tiny_data_dir,
                *ONE_PROC,
                "train.zero_stage=0",
                "train.precision=fp32",
                "train.on_nonfinite=skip",
                "train.max_steps=4",
                "eval.every=4",
                "checkpoint.every=4",
            )
        ),
        env=make_env({"SLM_INJECT_NAN_AT_STEP": "3"}),
    )
    assert "step 3: non-finite loss or gradient, step skipped" in out.stderr
    last = rows(run_dir)[-1]
    assert last["step"] == 4 and last["skipped_steps"] == 1 and last["loss"] is not None


def test_world_size_change_resumes_through_a_universal_checkpoint_and_skip_counts(
    two_proc_run, tiny_data_dir, tmp_path
):
    """2 ranks (ZeRO-2) -> 1 rank with the same global batch; a NaN at step 9 is skipped (on_nonfinite=skip).
    The checkpoint is converted ahead with `slm convert`, as a user does before queueing the job: in a copy of the
    shared 2-process run, since the conversion writes into the step folder."""
    source = tmp_path / "source"
    shutil.copytree(two_proc_run(2), source)
    step_6 = source / "checkpoints" / "step_00000006"
    converted = run(slm_cmd(["convert", str(step_6)]))
    assert converted.stdout.strip() == str(step_6 / "universal")  # stdout: the result only
    assert (step_6 / "universal" / "universal.json").is_file()
    run_dir = tmp_path / "run"
    out = run(
        slm_cmd(
            train_args(
                run_dir,
                tiny_data_dir,
                *ONE_PROC,
                "train.on_nonfinite=skip",
                "export.every=12",
                f"checkpoint.resume={source / 'checkpoints' / 'step_00000006'}",
            )
        ),
        env=make_env({"SLM_INJECT_NAN_AT_STEP": "9"}),
    )
    assert "universal checkpoint" in out.stderr and "at step 6" in out.stderr
    assert "converting" not in out.stderr  # the conversion made ahead is reused
    two, one = losses(source), losses(run_dir)
    for step in (7, 8):  # same weights, optimizer state and data, one rank instead of two
        assert one[step] == pytest.approx(two[step], rel=1e-5)
    assert one[9] is None and all(one[s] is not None and one[s] < 9 for s in (10, 11, 12))
    assert [r["skipped_steps"] for r in rows(run_dir)] == [0, 0, 1, 1, 1, 1]
    assert rows(run_dir, "eval")[-1]["val_loss"] < 8.0
    assert read_record(find_checkpoint(run_dir)).world_size == 1
    export = run_dir / "exports" / "step_00000012"  # export.every
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))


def test_mismatched_checkpoint_is_refused_naming_the_difference(single_run, tiny_data_dir, tmp_path):
    out = run(
        slm_cmd(
            train_args(
                tmp_path / "run",
                tiny_data_dir,
                *ONE_PROC,
                "model.d_model=96",
                f"checkpoint.resume={single_run}",
            )
        ),
        check=False,
    )
    assert out.returncode == 2
    assert "Refusing to resume" in out.stderr and "model.d_model is 64 in the checkpoint but 96" in out.stderr
    assert "Traceback" not in out.stderr


def test_preflight_refuses_a_run_that_cannot_fit_before_building_the_model(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = run(
        slm_cmd(
            [
                "train",
                str(Path(TINY).parent / "1b.yaml"),
                f"run.dir={run_dir}",
                f"data.dir={tiny_data_dir}",
                "train.micro_batch_size=256",
            ]
        ),
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Preflight" in out.stderr and "would not fit" in out.stderr
    assert not (run_dir / "config.yaml").exists()  # stopped before the engine (and the model) existed


def test_cpt_refuses_an_init_source_trained_with_another_tokenizer(single_run, tiny_data_dir, tmp_path):
    other = tmp_path / "data"
    shutil.copytree(tiny_data_dir, other)
    tokenizer = other / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))  # same tokens, other bytes
    out = run(
        slm_cmd(
            [
                "train",
                TINY,
                f"run.dir={tmp_path / 'run'}",
                f"data.dir={other}",
                *SHRINK,
                "train.stage=cpt",
                f"train.init_from={single_run}",
            ]
        ),
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "was trained with another tokenizer" in out.stderr and "Traceback" not in out.stderr


def test_torch_compile_follows_the_eager_curve(single_run, tmp_path, tiny_data_dir):
    """train.compile=true (torch.compile through DeepSpeed's engine.compile) trains the same model.

    Slow (about 15-30 s on 2 busy cores with Inductor's cache of an earlier run, over 100 s without it): one
    12-step run, most of it Inductor compiling the forward and backward graphs to C++ (the eager reference is the
    shared single_run)."""
    run_dir = tmp_path / "compiled"
    run(slm_cmd(train_args(run_dir, tiny_data_dir, *ONE_PROC, "train.compile=true")), timeout=600)
    eager, compiled = losses(single_run), losses(run_dir)
    assert sorted(compiled) == sorted(eager)
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-3), f"step {step}"
