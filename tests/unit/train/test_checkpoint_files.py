"""The per-file record of a checkpoint: damage is named, resume=auto falls back, rotation deletes only our folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from train.checkpoint import (
    COMPLETE,
    DS_MODEL_STATES,
    META,
    TOKENIZER,
    CheckpointDamaged,
    complete_checkpoints,
    intact_resume,
    prune_checkpoints,
    read_record,
    record_files,
    rng_file,
    step_tag,
    verify_checkpoint,
)
from train.checkpoint.files import newest_intact, verify_files
from train.config import CheckpointConfig

TOKENIZER_BYTES = b'{"fake": "tokenizer"}'


def make_checkpoint(ckpt_dir: Path, step: int) -> Path:
    step_dir = ckpt_dir / step_tag(step)
    step_dir.mkdir(parents=True)
    (step_dir / DS_MODEL_STATES).write_bytes(bytes(range(256)) * 200)
    rng_file(step_dir, 0).write_bytes(b"r" * 100)
    (step_dir / TOKENIZER).write_bytes(TOKENIZER_BYTES)
    meta = {
        "step": step,
        "tokens_seen": 0,
        "config": {},
        "tokenizer_sha256": hashlib.sha256(TOKENIZER_BYTES).hexdigest(),
        "manifest_sha256": "m",
        "world_size": 1,
        "zero_stage": 0,
        **record_files(step_dir),
    }
    (step_dir / META).write_text(json.dumps(meta))
    (step_dir / COMPLETE).write_text("x")
    return step_dir


def test_record_names_every_file_and_verification_names_the_damaged_one(tmp_path):
    step_dir = make_checkpoint(tmp_path, 4)
    record = read_record(step_dir)
    assert set(record.files) == {"mp_rank_00_model_states.pt", "rng_rank00000.pt", "tokenizer.json"}
    verify_checkpoint(step_dir, record)
    weights = step_dir / DS_MODEL_STATES
    data = bytearray(weights.read_bytes())
    data[1000:1100] = b"\x00" * 100  # same size, other bytes
    weights.write_bytes(bytes(data))
    verify_files(step_dir, record, hashes=False)  # sizes only: not seen
    with pytest.raises(
        CheckpointDamaged,
        match="mp_rank_00_model_states.pt has xxh3_128|mp_rank_00_model_states.pt has sha256",
    ):
        verify_files(step_dir, record)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointDamaged, match="mp_rank_00_model_states.pt has 51190 bytes"):
        verify_files(step_dir, record, hashes=False)
    weights.unlink()
    with pytest.raises(CheckpointDamaged, match="incomplete: mp_rank_00_model_states.pt is missing"):
        verify_files(step_dir, record, hashes=False)


def test_unrecorded_pickle_and_swapped_tokenizer_are_refused(tmp_path):
    step_dir = make_checkpoint(tmp_path, 4)
    record = read_record(step_dir)
    (step_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(
        CheckpointDamaged,
        match="zero_pp_rank_1_mp_rank_00_optim_states.pt, which its meta.json does not list",
    ):
        verify_files(step_dir, record)
    (step_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (step_dir / TOKENIZER).write_bytes(TOKENIZER_BYTES.replace(b"fake", b"swap"))  # same size
    with pytest.raises(CheckpointDamaged, match="tokenizer.json"):
        verify_checkpoint(step_dir, record, hashes=False)


def test_resume_auto_falls_back_to_the_previous_intact_checkpoint(tmp_path, capsys):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6):
        make_checkpoint(ckpt_dir, step)
    (ckpt_dir / "step_00000006" / DS_MODEL_STATES).unlink()
    rng_file(ckpt_dir / "step_00000004", 0).write_bytes(b"R" * 100)
    chosen = intact_resume(CheckpointConfig(resume="auto"), tmp_path / "run", ckpt_dir / "step_00000006")
    assert chosen == ckpt_dir / "step_00000002"
    out = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt is missing" in out and "rng_rank00000.pt has" in out
    assert "resuming from step_00000002 instead of the damaged step_00000006, step_00000004" in out
    with pytest.raises(
        CheckpointDamaged, match="step_00000006 is incomplete"
    ):  # an explicit path is not replaced
        intact_resume(
            CheckpointConfig(resume=str(ckpt_dir / "step_00000006")),
            tmp_path / "run",
            ckpt_dir / "step_00000006",
        )
    (ckpt_dir / "step_00000002" / TOKENIZER).unlink()
    with pytest.raises(CheckpointDamaged, match="Every complete checkpoint is damaged"):
        newest_intact(reversed(complete_checkpoints(ckpt_dir)), True, print)


def test_rotation_removes_only_our_old_checkpoints_and_temporary_folders(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        make_checkpoint(ckpt_dir, step)
    (ckpt_dir / "tmp.step_00000008").mkdir()
    (ckpt_dir / "tmp.notes").mkdir()  # a user's folder that happens to start with tmp.
    (ckpt_dir / "tmp.notes" / "keep.txt").write_text("mine")
    (ckpt_dir / "tmp.step_backup.txt").write_text("mine too")
    (ckpt_dir / "step_00000001").mkdir()  # incomplete: not ours to judge, left alone
    removed = prune_checkpoints(ckpt_dir, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000002", "tmp.step_00000008"]
    assert (ckpt_dir / "tmp.notes" / "keep.txt").read_text() == "mine"
    assert (ckpt_dir / "tmp.step_backup.txt").is_file() and (ckpt_dir / "step_00000001").is_dir()


def test_a_hand_edited_record_is_checked_against_itself(tmp_path, capsys):
    """meta.json's step must be its folder's; a record without its file list is loaded, but not silently."""
    step_dir = make_checkpoint(tmp_path, 4)
    meta = json.loads((step_dir / META).read_text())
    (step_dir / META).write_text(json.dumps({**meta, "step": 40}))
    with pytest.raises(CheckpointDamaged, match="records step 40, but the folder is step 4"):
        verify_checkpoint(step_dir, read_record(step_dir))
    del meta["files"]
    (step_dir / META).write_text(json.dumps(meta))
    capsys.readouterr()
    verify_checkpoint(step_dir, read_record(step_dir))
    assert "meta.json has no file record" in capsys.readouterr().err
