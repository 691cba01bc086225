"""Typed configs of the data pipeline: raw sources, the tokenizer, the prepared shards, instruction data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from common.checks import check_at_least, check_choice, check_finite_fields, check_positive, check_range

DOC_BOUNDARIES = ("file", "blank_line", "line")
ENCODING_ERRORS = ("strict", "replace")
OVERLONG = ("truncate", "drop")
MAX_VOCAB_SIZE = 2**32
"""Token ids are stored as uint16 or uint32 (data_pipeline/format/shards.py): no vocabulary may be larger."""


@dataclass
class SourceConfig:
    path: str = "data/tinyshakespeare.txt"
    """Local file, directory or glob (text, jsonl/json, parquet), or a Hugging Face dataset name when online."""
    weight: float = 1.0
    """Relative sampling weight of this source when several are mixed."""
    text_field: str = "text"
    """Field holding the document text in jsonl/json/parquet records."""
    doc_boundary: str = "file"
    """How plain text splits into documents: file (whole file), blank_line, or line."""
    name: Optional[str] = None
    """Short name used in the manifest and in logs; defaults to the file stem."""
    hf_split: str = "train"
    """Split to stream when path names a Hugging Face dataset."""

    def validate(self, key: str = "data.sources[0]") -> None:
        """Raise ValueError naming the key (`key` is this source's place in the config)."""
        check_finite_fields(self, key)
        if self.weight <= 0:
            raise ValueError(f"config key '{key}.weight' is {self.weight}; expected a positive number.")
        if self.doc_boundary not in DOC_BOUNDARIES:
            raise ValueError(
                f"config key '{key}.doc_boundary' is {self.doc_boundary!r}; expected file, blank_line or line."
            )


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary to train (special tokens included)."""
    path: Optional[str] = None
    """An existing tokenizer.json to use instead of training one."""
    min_frequency: int = 2
    """Minimum pair frequency for a BPE merge."""
    max_train_docs: Optional[int] = None
    """Train the tokenizer on at most this many documents (streamed); null means all."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_positive("tokenizer.vocab_size", self.vocab_size)
        check_range(
            "tokenizer.vocab_size", self.vocab_size, 1, MAX_VOCAB_SIZE, what="a token count (uint32 ids)"
        )
        if self.max_train_docs is not None:
            check_at_least("tokenizer.max_train_docs", self.max_train_docs, 1, " (null: every document)")


@dataclass
class DataConfig:
    dir: str = "runs/data/tiny"
    """Folder of the prepared data (tokenizer.json, manifest.json, *.bin shards): a path or an fsspec URL (s3://...)."""
    storage_options: Dict[str, Any] = field(default_factory=dict)
    """fsspec options for a URL data.dir (e.g. client_kwargs.endpoint_url); credentials best come from the environment."""
    cache_dir: Optional[str] = None
    """Local cache of a URL data.dir's shards (and the staging folder of a prepare to a URL); null: node-local temp."""
    cache_limit: Optional[int] = None
    """Bytes the shard cache may hold (LRU); smaller than what the next batches need means ranged reads. null: no bound."""
    sources: List[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    """Raw corpora to prepare and mix."""
    val_fraction: float = 0.05
    """Fraction of documents (or of the tail, for a single document) held out for validation."""
    shard_tokens: int = 1_048_576
    """Tokens per shard file."""
    num_proc: int = 0
    """Tokenizer worker processes for prepare; 0 means all cores."""
    num_workers: int = 0
    """DataLoader worker processes per rank during training."""
    encoding_errors: str = "strict"
    """What to do with bytes that are not UTF-8: strict (error naming the file) or replace (count them)."""
    verify_checksums: bool = False
    """Check every shard's full sha256 before training (sizes are always checked)."""
    document_mask: bool = False
    """Pretraining attends within documents only (split at EOT tokens), positions restarting at each."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_finite_fields(self, "data")
        check_choice("data.encoding_errors", self.encoding_errors, ENCODING_ERRORS)
        check_positive("data.shard_tokens", self.shard_tokens)
        check_at_least("data.num_proc", self.num_proc, 0, " (0: all cores)")
        check_at_least("data.num_workers", self.num_workers, 0)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(
                f"config key 'data.val_fraction' is {self.val_fraction}; expected a number in [0, 1)."
            )
        if self.cache_limit is not None and self.cache_limit < 0:
            raise ValueError(
                f"config key 'data.cache_limit' is {self.cache_limit}; expected a size in bytes >= 0, "
                "or null for no bound."
            )
        if not self.sources:
            raise ValueError("config key 'data.sources' is empty; expected at least one source.")
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources[{i}]")


@dataclass
class InstructConfig:
    paths: List[str] = field(default_factory=lambda: ["data/self_instruct_seed_tasks.jsonl"])
    """Instruction data files (jsonl): chat messages, instruction/input/output, or self-instruct records."""
    packing: bool = True
    """Pack several examples into one sequence (attention masked per example, positions restarting)."""
    overlong: str = "truncate"
    """Examples longer than the sequence: truncate or drop (counted either way)."""
    val_fraction: float = 0.05
    """Fraction of examples held out for validation."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_finite_fields(self, "ift")
        check_choice("ift.overlong", self.overlong, OVERLONG)
