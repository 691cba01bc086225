"""The per-file record of a checkpoint (size and hash of every file it holds) and its verification.

A save adds `files` to meta.json (written before COMPLETE): for each file, relative to the step folder,
its size and its xxh3-128 hash (sha256 where xxhash is not installed; the algorithm is recorded). A load
checks sizes always and hashes unless `checkpoint.verify_hashes=false`, and refuses any `.pt`
file the record does not list, so a damaged, truncated, swapped or smuggled-in file is named before
DeepSpeed or torch reads it. The hash guards against corruption, not against someone who can also
rewrite meta.json: that is the trust boundary of docs/guarantees.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from common.files import file_sha256
from common.json_fields import field_problem
from common.log import say
from train.checkpoint.layout import (
    COMPLETE,
    META,
    TMP_PREFIX,
    TOKENIZER,
    UNIVERSAL,
    is_step_name,
    step_of,
    tokenizer_file,
)
from train.checkpoint.record import FILES_KEY, HASH_KEY, CheckpointRecord, read_record
from train.errors import TrainError

NOT_RECORDED = (META, COMPLETE)
"""meta.json holds the record; COMPLETE is written after it."""
CHUNK = 8 * 1024 * 1024


class CheckpointDamaged(TrainError):
    """A checkpoint whose files do not match its own record."""


def hash_algorithm() -> str:
    try:
        import xxhash  # noqa: F401  (installed with datasets)
    except ImportError:
        return "sha256"
    return "xxh3_128"


def file_digest(path: Path, algorithm: str) -> str:
    if algorithm == "xxh3_128":
        import xxhash

        hasher: Any = xxhash.xxh3_128()
    elif algorithm == "sha256":
        hasher = hashlib.sha256()
    else:
        raise TrainError(f"Unknown checkpoint hash algorithm {algorithm!r}; expected xxh3_128 or sha256.")
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            hasher.update(block)
    return hasher.hexdigest()


def checkpoint_files(step_dir: Path) -> List[Path]:
    """Every file of a step folder that the record covers (the universal sub-checkpoint has its own)."""
    return sorted(
        p
        for p in step_dir.rglob("*")
        if p.is_file()
        and p.name not in NOT_RECORDED
        and p.relative_to(step_dir).parts[0] not in (UNIVERSAL, TMP_PREFIX + UNIVERSAL)
    )


def record_of(folder: Path, paths: Iterable[Path]) -> Dict[str, Any]:
    """{"files": {name relative to folder: {"size", "hash"}}, "files_hash": algorithm} of `paths`."""
    algorithm = hash_algorithm()
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "hash": file_digest(p, algorithm)}
        for p in paths
    }
    return {FILES_KEY: files, HASH_KEY: algorithm}


def record_files(step_dir: Path) -> Dict[str, Any]:
    """The file record of a step folder, for meta.json."""
    return record_of(step_dir, checkpoint_files(step_dir))


def verify_files(step_dir: Path, checkpoint: CheckpointRecord, hashes: bool = True) -> bool:
    """CheckpointDamaged naming the first bad file; False when the checkpoint predates the record."""
    record = checkpoint.files
    if record is None:
        return False
    if not isinstance(record, dict):
        raise CheckpointDamaged(
            f"Checkpoint {step_dir}: meta.json's '{FILES_KEY}' is not a mapping of file records."
        )
    for name, entry in sorted(record.items()):
        problem = field_problem(entry, {"size": int, "hash": str}, required=("size", "hash"))
        if problem or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointDamaged(
                f"Checkpoint {step_dir}: meta.json's file record for {name!r} is damaged or hand-edited "
                f"({problem or 'a name outside the step folder'}); expected {{'size': bytes, 'hash': digest}} "
                "for a file inside the folder."
            )
        path = step_dir / name
        if not path.is_file():
            raise CheckpointDamaged(
                f"Checkpoint {step_dir} is incomplete: {name} is missing (meta.json records "
                f"{entry.get('size')} bytes)."
            )
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointDamaged(
                f"Checkpoint {step_dir} is damaged: {name} has {size} bytes, meta.json records "
                f"{entry.get('size')}."
            )
    extra = sorted(
        p.relative_to(step_dir).as_posix()
        for p in checkpoint_files(step_dir)
        if p.suffix == ".pt" and p.relative_to(step_dir).as_posix() not in record
    )
    if extra:
        raise CheckpointDamaged(
            f"Checkpoint {step_dir} holds {', '.join(extra)}, which its meta.json does not list; "
            "refusing files the save did not write."
        )
    if hashes:
        algorithm = checkpoint.files_hash
        for name, entry in sorted(record.items()):
            digest = file_digest(step_dir / name, algorithm)
            if digest != entry.get("hash"):
                raise CheckpointDamaged(
                    f"Checkpoint {step_dir} is damaged: {name} has {algorithm} {digest[:16]}..., meta.json records "
                    f"{str(entry.get('hash'))[:16]}... (set checkpoint.verify_hashes=false to check sizes only)."
                )
    return True


def verify_tokenizer(step_dir: Path, checkpoint: CheckpointRecord) -> None:
    """The checkpoint's tokenizer.json must be the one its meta.json names (sha256)."""
    path = tokenizer_file(step_dir)
    expected = checkpoint.tokenizer_sha256
    if not path.is_file():
        raise CheckpointDamaged(
            f"Checkpoint {step_dir} has no {TOKENIZER}; expected the copy `slm train` saves."
        )
    actual = file_sha256(path)
    if expected and actual != expected:
        raise CheckpointDamaged(
            f"Checkpoint {step_dir}: tokenizer.json has sha256 {actual[:16]}... but meta.json "
            f"records {str(expected)[:16]}...; the tokenizer was replaced, so token ids would "
            "mean other things. Restore the checkpoint's own tokenizer.json."
        )


def verify_checkpoint(step_dir: Path, checkpoint: CheckpointRecord, hashes: bool = True) -> None:
    """Everything a load checks before any pickle is opened: the record against its folder, the file record and
    the tokenizer copy."""
    if is_step_name(step_dir.name) and step_of(step_dir) != checkpoint.step:
        raise CheckpointDamaged(
            f"Checkpoint {step_dir}: its meta.json records step {checkpoint.step}, but the folder is step "
            f"{step_of(step_dir)}; the record was edited or belongs to another checkpoint."
        )
    if not verify_files(step_dir, checkpoint, hashes):
        say(
            f"note: {step_dir}/meta.json has no file record (an slm train from before it existed, or an edited "
            "record): its files' sizes and hashes cannot be checked"
        )
    verify_tokenizer(step_dir, checkpoint)


def newest_intact(candidates: Iterable[Path], hashes: bool, say: Callable[[str], None]) -> Optional[Path]:
    """The newest candidate (given newest first) whose files match its record; each skipped one is reported."""
    skipped: List[str] = []
    for step_dir in candidates:
        try:
            verify_checkpoint(step_dir, read_record(step_dir), hashes)
        except TrainError as err:
            skipped.append(step_dir.name)
            say(f"warning: {err} Falling back to the previous complete checkpoint.")
            continue
        if skipped:
            say(f"resuming from {step_dir.name} instead of the damaged {', '.join(skipped)}")
        return step_dir
    if skipped:
        raise CheckpointDamaged(
            f"Every complete checkpoint is damaged ({', '.join(skipped)}); nothing to resume from. "
            "Restore one, or start a fresh run.dir."
        )
    return None
