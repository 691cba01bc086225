"""What the prepare modes (local.py, parts.py, remote.py) share: the folder's lock and the claim of a fresh
data.dir, the fingerprint of a config and the check that a folder came from it, the chunking of the
document stream, the manifest of the finished shards, and the report of a complete folder.

A fresh prepare writes tokenizer.json and `<source>-<split>-NNNNN.bin` shards, and its restart logic cuts
and removes shard files by name. In a folder holding someone else's files that could overwrite or delete
them, so a fresh start requires data.dir to be absent, empty, or left by an earlier prepare (its
`.prepare` work folder or lock file present); the work folder is created at once to mark the folder ours.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TypeVar

from tokenizers import Tokenizer

from common import faults
from common.files import file_sha256
from common.json_fields import field_problem
from common.log import say
from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.format.manifest import FORMAT_VERSION, Manifest, summary_table
from data_pipeline.format.names import LOCK, MANIFEST, SPLITS, TOKENIZER, WORK_DIR
from data_pipeline.format.shards import ShardRecord
from data_pipeline.sources.corpus import source_fingerprint
from data_pipeline.tokenizer import eot_id, load_tokenizer, token_dtype, tokenizer_vocab_size

CHUNK_BYTES = 1 << 18
"""Text per tokenization task (common.faults.prepare_chunk_bytes overrides it for tests and tuning)."""
T = TypeVar("T")


STATE_FIELDS = {
    "format_version": int,
    "prepared_from": dict,
    "tokenizer_sha256": str,
    "journal_bytes": int,
    "sources_done": list,
    "source_index": int,
    "source": dict,
}
"""The JSON type of each field of .prepare/state.json (the last commit of an unfinished prepare)."""
SOURCE_FIELDS = {
    "documents": int,
    "train_documents": int,
    "val_documents": int,
    "replaced_chars": int,
    "val_rule": str,
    "position": list,
    "partial": dict,
}


def read_prepare_state(path: Path) -> Dict[str, Any]:
    """The state of an interrupted prepare in a local data.dir (parse_prepare_state)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        text = f"<not UTF-8: {err}>"
    return parse_prepare_state(text, str(path), str(path.parent.parent))


def parse_prepare_state(text: str, where: str, data_dir: str) -> Dict[str, Any]:
    """The state of an interrupted prepare, every field of the type `engine.PrepareRun._state` writes; a
    truncated, empty or hand-edited file is a DataError naming it (it is written atomically, so only damage
    from outside gets here)."""

    def damaged(problem: str) -> DataError:
        return DataError(
            f"The state of an interrupted prepare, {where}, is damaged ({problem}), so the prepare cannot resume "
            f"where it stopped. Delete {data_dir} (everything in it was written by slm prepare) and prepare again."
        )

    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise damaged(f"not JSON: {err}") from None
    problem = field_problem(state, STATE_FIELDS, required=tuple(STATE_FIELDS), minimum={"journal_bytes": 0})
    source = state["source"] if problem is None else None
    problem = problem or field_problem(source, SOURCE_FIELDS, required=tuple(SOURCE_FIELDS))
    if problem is None:
        position, partial = source["position"], source["partial"]
        if len(position) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in position):
            problem = f"source.position is {position!r}; expected [file index, row]"
        elif any(
            field_problem(part, {"index": int, "tokens": int}, ("index", "tokens"))
            for part in partial.values()
        ):
            problem = "source.partial holds an entry without integer index and tokens"
    if problem:
        raise damaged(problem)
    return state


def read_journal(path: Path) -> List[ShardRecord]:
    """The sealed shards an interrupted prepare journaled (one ShardRecord per line); a damaged line is a
    DataError naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(ShardRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise DataError(
                    f"{path}:{number}: the shard journal of an interrupted prepare is damaged ({err}). Delete "
                    f"{path.parent.parent} (everything in it was written by slm prepare) and prepare again."
                ) from None
    return records


def resolve_num_proc(num_proc: int) -> int:
    if num_proc > 0:
        return num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def prepare_lock(data_dir: Path) -> Iterator[None]:
    """One prepare per folder at a time (e.g. several ranks calling it): the others wait, then find it complete."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"prepare: another prepare of {data_dir} is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def claim_fresh_data_dir(data_dir: Path) -> None:
    """DataError naming the foreign entries when data_dir holds files an earlier prepare did not write."""
    entries = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    ours = WORK_DIR in entries
    foreign = [
        name
        for name in entries
        if name not in (WORK_DIR, LOCK)
        and not (ours and name.endswith(".bin"))
        and not (ours and name == TOKENIZER)
    ]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DataError(
            f"data.dir {data_dir} already holds files that `slm prepare` did not write ({shown}); prepare "
            "writes tokenizer.json and shard files there and could overwrite them. Choose an empty or new "
            "data.dir."
        )
    (data_dir / WORK_DIR).mkdir(parents=True, exist_ok=True)


def tokenizer_fingerprint(tokenizer_cfg: TokenizerConfig) -> Dict[str, Any]:
    if tokenizer_cfg.path:
        return {"from": "file"}
    return {
        "from": "trained",
        "vocab_size": tokenizer_cfg.vocab_size,
        "min_frequency": tokenizer_cfg.min_frequency,
        "max_train_docs": tokenizer_cfg.max_train_docs,
    }


def prepare_fingerprint(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig) -> Dict[str, Any]:
    """Everything that determines the shards' bytes (not weights, num_proc or workers)."""
    return {
        "sources": [source_fingerprint(s) for s in data_cfg.sources],
        "val_fraction": data_cfg.val_fraction,
        "shard_tokens": data_cfg.shard_tokens,
        "encoding_errors": data_cfg.encoding_errors,
        "tokenizer": tokenizer_fingerprint(tokenizer_cfg),
    }


def first_difference(old: Any, new: Any, key: str = "") -> Optional[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            diff = first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else k)
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            diff = first_difference(a, b, f"{key}[{i}]")
            if diff:
                return diff
        return None
    return None if old == new else f"{key}: was {old!r}, now {new!r}"


def check_same_origin(
    where: Path,
    data_dir: Path,
    recorded: Dict[str, Any],
    recorded_sha: str,
    fingerprint: Dict[str, Any],
    tokenizer_cfg: TokenizerConfig,
) -> None:
    """DataError unless the data in data_dir (complete or half-prepared) came from this same config."""
    if tokenizer_cfg.path:
        sha = file_sha256(tokenizer_cfg.path) if Path(tokenizer_cfg.path).is_file() else None
        if sha != recorded_sha:
            load_tokenizer(tokenizer_cfg.path)
            raise DataError(
                f"{where} was made with another tokenizer (sha256 {recorded_sha}) than tokenizer.path="
                f"{tokenizer_cfg.path} (sha256 {sha}); its shards cannot be reused. Use a new data.dir."
            )
        recorded = {**recorded, "tokenizer": fingerprint["tokenizer"]}
    diff = first_difference(recorded, fingerprint)
    if diff:
        raise DataError(
            f"{where} was prepared from a different config ({diff}). Use a new data.dir, or delete "
            f"{data_dir} to prepare it again."
        )


def text_chunks(items: Iterable[T], text: Callable[[T], str]) -> Iterator[List[T]]:
    """The items in runs of ~CHUNK_BYTES of text (the last run shorter): the tokenization tasks. The cut never
    depends on the number of workers, so neither do the shards."""
    chunk_bytes = faults.prepare_chunk_bytes(CHUNK_BYTES)
    run: List[T] = []
    chars = 0
    for item in items:
        run.append(item)
        chars += len(text(item))
        if chars >= chunk_bytes:
            yield run
            run, chars = [], 0
    if run:
        yield run


def build_manifest(
    data_dir: Path,
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    tokenizer_sha: str,
    sources: List[Dict[str, Any]],
    records: Sequence[ShardRecord],
    names: List[str],
    fingerprint: Dict[str, Any],
) -> Manifest:
    """The manifest of a finished prepare, its shards in stream order (source, split, index)."""
    return Manifest(
        path=data_dir / MANIFEST,
        format_version=FORMAT_VERSION,
        dtype=token_dtype(tokenizer_vocab_size(tokenizer)),
        tokenizer_sha256=tokenizer_sha,
        vocab_size=tokenizer_vocab_size(tokenizer),
        eot_id=eot_id(tokenizer),
        val_fraction=data_cfg.val_fraction,
        shard_tokens=data_cfg.shard_tokens,
        sources=sources,
        shards=sorted(records, key=lambda r: (names.index(r.source), SPLITS.index(r.split), r.index)),
        prepared_from=fingerprint,
    )


def report_complete(where: Any, manifest: Manifest) -> None:
    say(
        f"prepare: {where} is already complete ({len(manifest.shards)} shards, "
        f"{manifest.tokens('train'):,} train + {manifest.tokens('val'):,} val tokens); nothing to do."
    )
    print(summary_table(manifest))
