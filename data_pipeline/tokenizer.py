"""The byte-level BPE tokenizer: trained from a streamed iterator, saved as one tokenizer.json whose
sha256 is the tokenizer's identity from then on (shards, checkpoints and exports all record it)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.atomic import atomic_write_bytes, atomic_write_text
from data_pipeline.config import MAX_VOCAB_SIZE
from data_pipeline.errors import DataError

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END, PAD)
"""In id order: EOT is id 0 in every tokenizer we train."""
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
"""Every byte must be a token (byte-level BPE never meets an unknown character), plus the specials."""
VOCAB_MULTIPLE = 64


def check_vocab_size(vocab_size: int, target: Path) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"tokenizer.vocab_size={vocab_size} is too small for the tokenizer {target}: a byte-level BPE needs "
            f"{BYTE_ALPHABET_SIZE} byte tokens plus {len(SPECIAL_TOKENS)} special tokens ({', '.join(SPECIAL_TOKENS)}), "
            f"so at least {MIN_VOCAB_SIZE}."
        )


PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"


def tokenizers_single_threaded(force: bool = False) -> None:
    """The one place that sets TOKENIZERS_PARALLELISM: off (unless the user set it, or `force`), because a process
    that forks workers (prepare's pool, DataLoader workers) must not carry the Rust thread pool into them."""
    if force:
        os.environ[PARALLELISM_ENV] = "false"
    else:
        os.environ.setdefault(PARALLELISM_ENV, "false")


@contextmanager
def _rust_parallelism(threads: int) -> Iterator[None]:
    """Let the Rust trainer use `threads` cores, then switch it off again before any worker is forked."""
    saved = {key: os.environ.get(key) for key in (PARALLELISM_ENV, "RAYON_NUM_THREADS")}
    os.environ[PARALLELISM_ENV] = "true" if threads > 1 else "false"
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    threads: int = 1,
    target: Path = Path("tokenizer.json"),
) -> Tokenizer:
    """Train a byte-level BPE from an iterator; only pair statistics are held, never the corpus."""
    check_vocab_size(vocab_size, target)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _rust_parallelism(threads):
        tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    atomic_write_text(path, tokenizer.to_str(pretty=True) + "\n")


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy an existing tokenizer.json byte for byte, so its sha256 (identity) is preserved."""
    load_tokenizer(src)
    atomic_write_bytes(dst, Path(src).read_bytes())


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json that defines every special token; DataError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Tokenizer file {path} does not exist; expected a tokenizer.json written by `slm prepare`."
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise DataError(
            f"Tokenizer file {path} could not be loaded ({err}); expected a Hugging Face tokenizer.json."
        ) from None
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        raise DataError(
            f"Tokenizer file {path} lacks the special token(s) {', '.join(missing)}; slm-forge tokenizers must define "
            f"{', '.join(SPECIAL_TOKENS)} ({EOT} separates documents, the others are reserved for instruction tuning)."
        )
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    return int(tokenizer.token_to_id(EOT))


def tokenizer_vocab_size(tokenizer: Tokenizer) -> int:
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def model_vocab_size(tokenizer: Tokenizer) -> int:
    """Embedding rows for the model: the tokenizer's size rounded up to a multiple of 64 (tensor-core friendly)."""
    size = tokenizer_vocab_size(tokenizer)
    return VOCAB_MULTIPLE * ((size + VOCAB_MULTIPLE - 1) // VOCAB_MULTIPLE)


def token_dtype(vocab_size: int) -> str:
    """Shard dtype: uint16 while the vocabulary fits in 65,535 ids' worth, uint32 beyond (ValueError past
    uint32)."""
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(
            f"a vocabulary of {vocab_size:,} tokens does not fit the largest token dtype, uint32 (at most "
            f"{MAX_VOCAB_SIZE:,} tokens)"
        )
    return "uint16" if vocab_size <= 65535 else "uint32"


def _byte_level_decoder() -> dict:
    """GPT-2's byte <-> printable-unicode table, inverted (the alphabet ByteLevel tokens are written in)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for (special tokens count 0), for bits-per-byte.

    Exact for byte-level BPE (what `slm prepare` trains); for other tokenizers it decodes each token alone,
    which is an approximation."""
    size = tokenizer_vocab_size(tokenizer)
    lengths = np.zeros(size, dtype=np.int64)
    specials = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    specials |= set(tokenizer.get_added_tokens_decoder())
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    table = _byte_level_decoder() if byte_level else {}
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if index in specials or index >= size:
            continue
        if byte_level and all(ch in table for ch in token):
            lengths[index] = len(token)
        else:
            lengths[index] = len(tokenizer.decode([index], skip_special_tokens=False).encode("utf-8"))
    return lengths
