"""Real runs against crafted, damaged and misplaced files: nothing runs, nothing of the user's is deleted,
damage is named, resume=auto falls back, Ctrl-C checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY, run, slm_cmd, slm_in_process
from tests.helpers import test_env as make_env
from train.checkpoint import META, record_files

pytestmark = pytest.mark.slow

SHRINK = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.max_seq_len=32",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "schedule.warmup_steps=1",
    "log.every=1",
    "eval.batches=2",
    "eval.every=100",
    "checkpoint.every=2",
    "data.num_workers=0",
]


def go(cmd, check: bool = True) -> subprocess.CompletedProcess:
    """A real `slm` process; generous timeout, since CI machines may be shared."""
    return run(cmd, timeout=1200, check=check)


def train_cmd(run_dir: Path, data_dir: Path, steps: int, *extra: str):
    return slm_cmd(
        [
            "train",
            TINY,
            f"run.dir={run_dir}",
            f"data.dir={data_dir}",
            *SHRINK,
            f"train.max_steps={steps}",
            *extra,
        ]
    )


class CreatesAFile:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def craft(path: Path, target: Path) -> None:
    torch.save({"module": CreatesAFile(target), "torch": torch.zeros(2)}, path)


def forge_record(step_dir: Path) -> None:
    """What someone who can write the folder can do: make meta.json's file record match the crafted file."""
    meta = json.loads((step_dir / META).read_text())
    meta.update(record_files(step_dir))
    (step_dir / META).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_data_dir) -> Path:
    """A 4-step run (checkpoints at 2 and 4) that every test copies: one `slm train` start-up for the module."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    go(train_cmd(run_dir, tiny_data_dir, 4))
    return run_dir


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step_{n:08d}"


def export_here(capsys, *args) -> tuple:
    """`slm export ARGS` through the CLI's main in this process (slm_in_process): its exit code and stderr, as a
    subprocess would give them, without a process start-up (several seconds on a busy machine) each time."""
    code, _, err = slm_in_process(capsys, "export", *args)
    return code, err


def test_crafted_rng_file_runs_nothing_on_resume(run_copy, tiny_data_dir, tmp_path):
    """Slow (about 35-45 s on 2 busy cores): two `slm train` processes, since the crafted file is met only where a
    resume loads it: one falls back to step 2 and trains to 6, one is refused at the load after DeepSpeed starts."""
    target = tmp_path / "pwned"
    craft(step(run_copy, 4) / "rng_rank00000.pt", target)
    out = go(train_cmd(run_copy, tiny_data_dir, 6))  # the record catches it: back to step 2
    assert (
        "rng_rank00000.pt has" in out.stderr
        and "resuming from step_00000002 instead of the damaged step_00000004" in out.stderr
    )
    assert not target.exists()
    craft(step(run_copy, 6) / "rng_rank00000.pt", target)
    forge_record(step(run_copy, 6))  # the record agrees: the weights_only load refuses it
    failed = go(train_cmd(run_copy, tiny_data_dir, 8), check=False)
    assert (
        failed.returncode == 2 and "Refusing to load" in failed.stderr and "rng_rank00000.pt" in failed.stderr
    )
    assert "Traceback" not in failed.stderr and not target.exists()


def test_crafted_model_states_runs_nothing_on_generate(run_copy, tmp_path, capsys):
    """`slm generate` in this process (slm_in_process): both refusals come at the load, before any generation;
    a load that ran the pickle would create `target` here as well as in a subprocess."""
    target = tmp_path / "pwned"
    model_states = step(run_copy, 4) / "mp_rank_00_model_states.pt"
    craft(model_states, target)
    code, _, err = slm_in_process(capsys, "generate", run_copy, "--prompt", "hi")
    assert code == 2 and "mp_rank_00_model_states.pt has" in err
    forge_record(step(run_copy, 4))
    code, _, err = slm_in_process(capsys, "generate", run_copy, "--prompt", "hi")
    assert code == 2 and "Refusing to load" in err and "Traceback" not in err
    assert not target.exists()


def test_damaged_weights_are_named_and_resume_falls_back(run_copy, tiny_data_dir):
    model_states = step(run_copy, 4) / "mp_rank_00_model_states.pt"
    data = bytearray(model_states.read_bytes())
    start = len(data) // 2
    data[start : start + 40_000] = torch.full((10_000,), 0.5).numpy().tobytes()  # 40 KB of weights set to 0.5
    model_states.write_bytes(bytes(data))
    explicit = go(
        train_cmd(run_copy, tiny_data_dir, 6, f"checkpoint.resume={step(run_copy, 4)}"), check=False
    )
    assert explicit.returncode == 2 and "is damaged: mp_rank_00_model_states.pt has" in explicit.stderr
    resumed = go(train_cmd(run_copy, tiny_data_dir, 6))
    assert "resuming from step_00000002 instead of the damaged step_00000004" in resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 2 " in resumed.stderr
    steps = [
        json.loads(line)["step"]
        for line in (run_copy / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == list(range(1, 7))


def test_missing_model_states_file_is_named(run_copy, capsys):
    (step(run_copy, 4) / "mp_rank_00_model_states.pt").unlink()
    code, err = export_here(capsys, step(run_copy, 4), run_copy.parent / "out")
    assert code == 2 and "incomplete: mp_rank_00_model_states.pt is missing" in err, err


def test_swapped_tokenizer_in_a_checkpoint_is_refused_before_export(run_copy, tmp_path, capsys):
    tokenizer = step(run_copy, 4) / "tokenizer.json"
    text = json.loads(tokenizer.read_text())
    text["added_tokens"][0]["content"] = "<|swapped|>"
    tokenizer.write_text(json.dumps(text))
    forge_record(step(run_copy, 4))  # even with a matching file record, meta.json's tokenizer sha256 differs
    code, err = export_here(capsys, run_copy, tmp_path / "out")
    assert code == 2 and "tokenizer.json has sha256" in err and not (tmp_path / "out").exists(), err


def test_export_never_deletes_what_it_did_not_write(run_copy, tmp_path, capsys):
    """Every `slm export` runs in this process (export_here): the six refusals stop before anything is loaded and
    the two exports that write start no process group, so a process each would only add start-ups."""
    before = sorted(p.relative_to(run_copy) for p in run_copy.rglob("*"))
    for src, out in (
        (run_copy, run_copy),
        (step(run_copy, 4), run_copy / "checkpoints"),
        (run_copy, run_copy / "hf"),
    ):
        code, err = export_here(capsys, src, out)
        assert code == 2 and "Refusing to export" in err, err
    assert sorted(p.relative_to(run_copy) for p in run_copy.rglob("*")) == before
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("precious")
    for force in ([], ["--force"]):
        code, err = export_here(capsys, run_copy, user, *force)
        assert code == 2 and "not an slm export" in err, err
    assert (user / "notes.txt").read_text() == "precious" and (user / "sub").is_dir()
    export = tmp_path / "export"
    code, err = export_here(capsys, run_copy, export)
    assert code == 0, err
    code, err = export_here(capsys, run_copy, export)
    assert code == 2 and "pass --force" in err, err
    code, err = export_here(capsys, run_copy, export, "--force")
    assert code == 0, err
    assert (export / "slm_export.json").is_file()


def test_ctrl_c_checkpoints_and_exits_3(tiny_data_dir, tmp_path):
    """About 30 s on 2 busy cores: one real `slm train` process (start-up, 3 steps, SIGINT, the checkpoint save)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(run_dir, tiny_data_dir, 400, "checkpoint.every=1000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=make_env(),
        cwd=str(REPO),
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "train step 3 " in line:
            break
    proc.send_signal(signal.SIGINT)
    output = "".join(seen) + proc.communicate(timeout=180)[0]
    assert proc.returncode == 3, output
    assert "received SIGINT" in output and "KeyboardInterrupt" not in output and "saved checkpoint" in output
    assert any((run_dir / "checkpoints").glob("step_*/COMPLETE"))
