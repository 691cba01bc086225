"""Tokenization of one chunk of documents, run in `data.num_proc` worker processes by the prepare engine.

Kept free of heavy imports (no torch, no datasets) so workers start fast under any start method.

Short documents are joined with EOT and encoded a group at a time: one `Encoding` per ~GROUP_CHARS of text
instead of one per document took ~9% less CPU on paragraph-sized documents (more on lines). The ids are
the same, because the tokenizer splits its input at special tokens before anything else looks at it; this
is only done for tokenizers where that is known to hold (`_groups_cleanly`), and checked on every chunk.
"""

from __future__ import annotations

import gc
import itertools
import signal
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from data_pipeline.tokenizer import EOT, tokenizers_single_threaded

GROUP_CHARS = 2048
"""Characters of text per joined group (1-4 KB measured best; much longer strings encode more slowly)."""

_TOKENIZER: Optional[Tokenizer] = None
_LITERAL: Optional[Tokenizer] = None
"""The same tokenizer with special tokens encoded as plain text (slower, so only for documents that need it)."""
_SPECIAL_PREFIXES: tuple = ()
_EOT_ID = 0
_DTYPE = np.uint16
_GROUPING = False


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
    global _TOKENIZER, _LITERAL, _SPECIAL_PREFIXES, _EOT_ID, _DTYPE, _GROUPING
    if worker_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        tokenizers_single_threaded(force=True)
    _TOKENIZER = Tokenizer.from_str(tokenizer_json)
    _LITERAL = Tokenizer.from_str(tokenizer_json)
    _LITERAL.encode_special_tokens = True
    added = [token.content for token in _TOKENIZER.get_added_tokens_decoder().values()]
    _SPECIAL_PREFIXES = tuple(sorted({content[:2] for content in added if content}))
    _EOT_ID = int(_TOKENIZER.token_to_id(EOT))
    _DTYPE = np.dtype(dtype).type
    _GROUPING = _groups_cleanly(_TOKENIZER)


def _groups_cleanly(tokenizer: Tokenizer) -> bool:
    """Whether encoding "a<EOT>b" surely gives the ids of "a", then EOT, then those of "b": EOT is matched
    exactly as written and nothing after the split at special tokens looks across pieces or at where a piece
    starts (byte-level BPE without normalizer, prefix space, dropout, truncation or padding, as prepare trains).
    Other tokenizers encode one document at a time."""
    eot = tokenizer.get_added_tokens_decoder().get(tokenizer.token_to_id(EOT))
    pre = tokenizer.pre_tokenizer
    post = tokenizer.post_processor
    return (
        eot is not None
        and eot.content == EOT
        and eot.special
        and not (eot.lstrip or eot.rstrip or eot.single_word or eot.normalized)
        and tokenizer.normalizer is None
        and tokenizer.truncation is None
        and tokenizer.padding is None
        and isinstance(pre, pre_tokenizers.ByteLevel)
        and not pre.add_prefix_space
        and (post is None or isinstance(post, processors.ByteLevel))
        and isinstance(tokenizer.model, models.BPE)
        and tokenizer.model.dropout is None
    )


def _units(texts: Sequence[str], grouping: bool) -> List[Tuple[bool, str]]:
    """(literal, text) to encode, in document order. A document that spells a special token (say
    "<|endoftext|>") is encoded alone by the literal tokenizer, so it can never forge a document boundary.
    With grouping, the others are joined into groups that end in EOT."""
    units: List[Tuple[bool, str]] = []
    group: List[str] = []
    size = 0
    joined = "\0".join(texts)  # one scan of the whole chunk usually shows that no document needs a look
    suspects = tuple(prefix for prefix in _SPECIAL_PREFIXES if prefix in joined)
    for text in texts:
        spelled = bool(suspects) and any(prefix in text for prefix in suspects)
        if grouping and not spelled:
            group.append(text)
            size += len(text)
            if size >= GROUP_CHARS:
                units.append((False, EOT.join(group) + EOT))
                group, size = [], 0
            continue
        if group:
            units.append((False, EOT.join(group) + EOT))
            group, size = [], 0
        units.append((spelled, text))
    if group:
        units.append((False, EOT.join(group) + EOT))
    return units


def _encode(texts: Sequence[str], grouping: bool) -> np.ndarray:
    """Token ids of the documents, each followed by EOT, as one array."""
    assert _TOKENIZER is not None and _LITERAL is not None, "init_worker was not called in this process"
    units = _units(texts, grouping)
    # encode_batch_fast: the ids without character offsets, which prepare never reads (~9% faster).
    plain = iter(
        _TOKENIZER.encode_batch_fast([t for literal, t in units if not literal], add_special_tokens=False)
    )
    spelled = iter(
        _LITERAL.encode_batch_fast([t for literal, t in units if literal], add_special_tokens=False)
    )
    ids: List[List[int]] = []
    for literal, _ in units:
        ids.append(next(spelled if literal else plain).ids)
        if literal or not grouping:  # a group already ends in EOT
            ids.append([_EOT_ID])
    total = sum(len(part) for part in ids)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=_DTYPE, count=total)


def _encode_documents(texts: Sequence[str]) -> np.ndarray:
    """`_encode`, grouped where the tokenizer allows it. A grouped result must hold exactly one EOT per
    document (any other split of a group would show there); otherwise the chunk is encoded one by one."""
    if _GROUPING:
        tokens = _encode(texts, grouping=True)
        if np.count_nonzero(tokens == _EOT_ID) == len(texts):
            return tokens
    return _encode(texts, grouping=False)


def encode_chunk(texts: Sequence[str], is_val: Sequence[bool]) -> EncodedChunk:
    """Tokenize documents, append EOT after each, and route them to train or val in document order."""
    collecting = gc.isenabled()
    gc.disable()  # millions of fresh int lists would trigger useless cycle collections (~3% of the time)
    try:
        train = [text for text, val in zip(texts, is_val) if not val]
        val = [text for text, val in zip(texts, is_val) if val]
        replaced = sum(text.count("\ufffd") for text in texts)
        return EncodedChunk(_encode_documents(train), _encode_documents(val), len(train), len(val), replaced)
    finally:
        if collecting:
            gc.enable()
