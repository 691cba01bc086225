"""Tokenization of one chunk of documents, run in `data.num_proc` worker processes by `prepare`.

Kept free of heavy imports (no torch, no datasets) so workers start fast under any start method.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.tokenizer import EOT

_TOKENIZER: Optional[Tokenizer] = None
_LITERAL: Optional[Tokenizer] = None
"""The same tokenizer with special tokens encoded as plain text (slower, so only for documents that need it)."""
_SPECIAL_PREFIXES: tuple = ()
_EOT_ID = 0
_DTYPE = np.uint16


@dataclass
class EncodedChunk:
    train: np.ndarray
    """Token ids of the chunk's train documents, each followed by EOT."""
    val: np.ndarray
    """Token ids of the chunk's validation documents, each followed by EOT."""
    train_documents: int
    val_documents: int
    replaced_chars: int
    """U+FFFD characters in the text (bytes that were not UTF-8, under data.encoding_errors=replace)."""


def init_worker(tokenizer_json: str, dtype: str, worker_process: bool = False) -> None:
    """Build this process's tokenizers once. A worker process leaves Ctrl-C to the main process, which
    stops the pool and tells the user how to resume."""
    global _TOKENIZER, _LITERAL, _SPECIAL_PREFIXES, _EOT_ID, _DTYPE
    if worker_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = Tokenizer.from_str(tokenizer_json)
    _LITERAL = Tokenizer.from_str(tokenizer_json)
    _LITERAL.encode_special_tokens = True
    added = [token.content for token in _TOKENIZER.get_added_tokens_decoder().values()]
    _SPECIAL_PREFIXES = tuple(sorted({content[:2] for content in added if content}))
    _EOT_ID = int(_TOKENIZER.token_to_id(EOT))
    _DTYPE = np.dtype(dtype).type


def _encode(texts: List[str]) -> List[List[int]]:
    """Token ids per document. Text that spells a special token (say "<|endoftext|>") is encoded as plain
    text, so a document can never forge a document boundary."""
    assert _TOKENIZER is not None and _LITERAL is not None, "init_worker was not called in this process"
    # encode_batch, not encode_batch_fast: the latter measured ~8% slower in bench/data_pipeline.py's setting.
    ids = [encoding.ids for encoding in _TOKENIZER.encode_batch(texts, add_special_tokens=False)]
    spelled = [i for i, text in enumerate(texts) if any(prefix in text for prefix in _SPECIAL_PREFIXES)]
    if spelled:
        literal = _LITERAL.encode_batch([texts[i] for i in spelled], add_special_tokens=False)
        for i, encoding in zip(spelled, literal):
            ids[i] = encoding.ids
    return ids


def _flatten(ids: List[List[int]]) -> np.ndarray:
    total = sum(len(doc) for doc in ids) + len(ids)
    stream = itertools.chain.from_iterable(itertools.chain(doc, (_EOT_ID,)) for doc in ids)
    return np.fromiter(stream, dtype=_DTYPE, count=total)


def encode_chunk(texts: Sequence[str], is_val: Sequence[bool]) -> EncodedChunk:
    """Tokenize documents, append EOT after each, and route them to train or val in document order."""
    collecting = gc.isenabled()
    gc.disable()  # millions of fresh int lists would trigger useless cycle collections (~3% of the time)
    try:
        train_ids: List[List[int]] = []
        val_ids: List[List[int]] = []
        for ids, val in zip(_encode(list(texts)), is_val):
            (val_ids if val else train_ids).append(ids)
        replaced = sum(text.count("\ufffd") for text in texts)
        return EncodedChunk(_flatten(train_ids), _flatten(val_ids), len(train_ids), len(val_ids), replaced)
    finally:
        if collecting:
            gc.enable()
