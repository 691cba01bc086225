"""Typed configs of the data pipeline: raw sources, the tokenizer, the prepared shards, instruction data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


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


@dataclass
class DataConfig:
    dir: str = "runs/data/tiny"
    """Folder of the prepared data: tokenizer.json, manifest.json and the *.bin shards."""
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
