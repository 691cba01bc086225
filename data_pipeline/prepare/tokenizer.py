"""The tokenizer of a prepare: copied from tokenizer.path, or trained on the train documents of every source."""

from __future__ import annotations

import time
from itertools import chain
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tokenizers import Tokenizer

from common.files import file_sha256
from common.log import say
from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.format.names import TOKENIZER
from data_pipeline.format.splits import tail_split, validation_mask
from data_pipeline.sources.corpus import describe_source, iter_documents
from data_pipeline.tokenizer import (
    copy_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_vocab_size,
    train_tokenizer,
)

TRAIN_BATCH = 256
"""Documents per batch handed to the tokenizer trainer."""


def train_documents(source: SourceConfig, data_cfg: DataConfig) -> Iterator[Tuple[int, str]]:
    """(index, text) of a source's train documents; a single document gives its head only, because its tail is
    the validation split (as the shards cut it: `tail_split`), which the tokenizer must not see either."""
    stream = iter_documents(source, data_cfg.encoding_errors)
    first, second = next(stream, None), next(stream, None)
    if first is not None and second is None:
        cut = tail_split(first.text, data_cfg.val_fraction)
        yield 0, first.text[:cut] if cut else first.text
        return
    for index, doc in enumerate(chain([d for d in (first, second) if d is not None], stream)):
        if not validation_mask(index, 1, data_cfg.val_fraction)[0]:
            yield index, doc.text


def training_texts(data_cfg: DataConfig, limit: Optional[int]) -> Iterator[List[str]]:
    """Batches of train documents from every source in turn (validation documents are never seen)."""
    streams = [(s, train_documents(s, data_cfg)) for s in data_cfg.sources]
    seen = [0] * len(streams)
    taken, batch = 0, []
    active = list(range(len(streams)))
    while active and (limit is None or taken < limit):
        for i in list(active):
            source, stream = streams[i]
            item = next(stream, None)
            if item is None:
                active.remove(i)
                if seen[i] == 0:
                    raise empty_source(source)
                continue
            seen[i] += 1
            batch.append(item[1])
            taken += 1
            if len(batch) == TRAIN_BATCH:
                yield batch
                batch = []
            if limit is not None and taken >= limit:
                break
    if batch:
        yield batch


def empty_source(source: SourceConfig) -> DataError:
    return DataError(
        f"Source {describe_source(source)} holds no documents (it is empty or only whitespace); expected non-empty text."
    )


def obtain_tokenizer(
    data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig, data_dir: Path, num_proc: int
) -> Tuple[Tokenizer, str]:
    target = data_dir / TOKENIZER
    if tokenizer_cfg.path:
        copy_tokenizer(tokenizer_cfg.path, target)
        say(f"prepare: tokenizer copied from {tokenizer_cfg.path}")
    else:
        started = time.time()
        say(
            f"prepare: training a byte-level BPE tokenizer (vocab {tokenizer_cfg.vocab_size}) on "
            f"{', '.join(describe_source(s) for s in data_cfg.sources)}"
        )
        tokenizer = train_tokenizer(
            training_texts(data_cfg, tokenizer_cfg.max_train_docs),
            tokenizer_cfg.vocab_size,
            tokenizer_cfg.min_frequency,
            threads=num_proc,
            target=target,
        )
        save_tokenizer(tokenizer, target)
        size = tokenizer_vocab_size(tokenizer)
        short = (
            f" (the corpus supports only {size} < {tokenizer_cfg.vocab_size})"
            if size < tokenizer_cfg.vocab_size
            else ""
        )
        say(f"prepare: tokenizer trained in {time.time() - started:.1f} s: {size} tokens{short}")
    return load_tokenizer(target), file_sha256(target)
