"""Field-by-field checks of a manifest.json before it is trusted: types, ranges and cross-references.

A hand-edited or damaged manifest then fails with a DataError naming the field, never a TypeError deep in
the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from data_pipeline.errors import DataError

SHARD_INTS = ("index", "tokens", "documents", "text_bytes")
SHARD_STRS = ("file", "split", "source", "dtype", "sha256")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest_fields(raw: Dict[str, Any], path: Path, splits: tuple, dtypes: tuple) -> None:
    def bad(what: str) -> DataError:
        return DataError(f"Manifest {path} is malformed: {what}; prepare the data again.")

    if not isinstance(
        raw.get("dtype"), str
    ):  # which names are allowed is checked with the shards (manifest.py)
        raise bad(f"dtype is {raw.get('dtype')!r}, expected one of {', '.join(dtypes)}")
    for key in ("vocab_size", "shard_tokens"):
        if not _is_int(raw.get(key)) or raw[key] <= 0:
            raise bad(f"{key} is {raw.get(key)!r}, expected a positive integer")
    if not _is_int(raw.get("eot_id")) or not 0 <= raw["eot_id"] < raw["vocab_size"]:
        raise bad(f"eot_id is {raw.get('eot_id')!r}, expected an id below vocab_size {raw['vocab_size']}")
    if not isinstance(raw.get("tokenizer_sha256"), str):
        raise bad("tokenizer_sha256 is not a string")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) for s in sources
    ):
        raise bad("sources is not a list of objects with a name")
    names = {s["name"] for s in sources}
    shards = raw.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise bad("shards is not a list of objects")
    for i, shard in enumerate(shards):
        for key in SHARD_INTS:
            if not _is_int(shard.get(key)) or shard[key] < 0:
                raise bad(f"shards[{i}].{key} is {shard.get(key)!r}, expected an integer >= 0")
        for key in SHARD_STRS:
            if not isinstance(shard.get(key), str):
                raise bad(f"shards[{i}].{key} is {shard.get(key)!r}, expected a string")
        if shard["split"] not in splits:
            raise bad(f"shards[{i}].split is {shard['split']!r}, expected one of {', '.join(splits)}")
        if shard["source"] not in names:
            raise bad(f"shards[{i}].source {shard['source']!r} is not among the sources {sorted(names)}")
