"""Whether a data.dir (complete or half-prepared) came from this config: the fingerprint of everything that
determines the shards' bytes, and the first difference when it does not match."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from common.files import file_sha256
from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import source_fingerprint
from data_pipeline.tokenizer import load_tokenizer


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
