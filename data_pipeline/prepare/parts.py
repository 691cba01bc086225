"""Prepare on many nodes: `slm prepare --tokenizer-only`, then `--part K/N` on N processes, then `--merge`.

A part tokenizes the K-th of N disjoint slices of every source: 1/N of its bytes, the files laid end to
end; a one-document-per-line text file is cut inside, on line boundaries, other files go whole to one part. It writes each source's documents as one EOT-terminated token
stream (`.parts/K-of-N/SOURCE.tokens`, with counts in `SOURCE.json`), not yet split into train and val,
and marks itself done last. The merge walks the parts in order, gives each document its index in the
whole source (which decides train or val, exactly as a single prepare does) and appends the documents to
the same ShardWriter a single prepare uses. Tokenization does not depend on how documents are chunked,
so the shards, their sha256 and the manifest equal those of a single-process prepare of the same config.

Limits: a jsonl/parquet file or a text file with file/blank_line documents is not cut (it goes whole to
one part), the parts and the merge need a shared local/POSIX data.dir, and a source with a single document (its tail is the
validation split) must be prepared without --part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

from common.atomic import atomic_write_json
from common.files import file_sha256
from common.log import say
from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.format.manifest import summary_table, write_manifest
from data_pipeline.format.names import DONE, MANIFEST, PARTS, SPLITS, TOKENIZER, WORK_DIR
from data_pipeline.format.shards import ShardWriter, open_shard
from data_pipeline.format.splits import validation_mask
from data_pipeline.prepare import encode
from data_pipeline.prepare.common import (
    build_manifest,
    prepare_fingerprint,
    prepare_lock,
    resolve_num_proc,
    text_chunks,
)
from data_pipeline.prepare.tokenizer import obtain_tokenizer
from data_pipeline.sources.corpus import file_format, iter_documents, resolve_files, source_names
from data_pipeline.sources.text import line_documents
from data_pipeline.tokenizer import (
    eot_id,
    load_tokenizer,
    token_byte_lengths,
    token_dtype,
    tokenizer_vocab_size,
)

MERGE_TOKENS = 1 << 24
"""Tokens of a part stream the merge holds in memory at a time."""


def parse_part(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise DataError(f"--part {text!r}: expected K/N with 1 <= K <= N, e.g. --part 2/8.")
    return int(match.group(1)), int(match.group(2))


def splittable(source: SourceConfig, path: Path) -> bool:
    """A file a part may cut by byte range: plain text with one document per line."""
    return source.doc_boundary == "line" and file_format(path) == "text"


def part_slices(source: SourceConfig, part: int, parts: int) -> List[Tuple[int, int, int]]:
    """(file index, first byte, end byte) of what part K of N tokenizes: 1/N of the source's bytes.

    The files are laid end to end and cut into N equal byte ranges. A one-document-per-line text file is
    cut inside (a line belongs to the range holding its first byte); any other file goes whole to the
    part whose range holds its first byte."""
    files = resolve_files(source)
    if not files:
        raise DataError(
            f"Source {source.path} is not a local file, folder or glob; --part slices local files only. "
            f"Prepare it without --part."
        )
    sizes = [f.stat().st_size for f in files]
    total = max(sum(sizes), 1)
    low, high = (part - 1) * total // parts, part * total // parts
    slices, offset = [], 0
    for index, (path, size) in enumerate(zip(files, sizes)):
        if splittable(source, path):
            start, end = max(low - offset, 0), min(high - offset, size)
            if start < end or (size == 0 and low <= offset < high):
                slices.append((index, start, end))
        elif low <= offset < high or (part == parts and offset >= high):
            slices.append((index, 0, size))
        offset += size
    return slices


def slice_documents(
    source: SourceConfig, slices: List[Tuple[int, int, int]], encoding_errors: str
) -> Iterator[str]:
    files = resolve_files(source)
    for index, start, end in slices:
        if splittable(source, files[index]):
            yield from line_documents(files[index], start, end, encoding_errors)
        else:
            for doc in iter_documents(source, encoding_errors, start=(index, 0)):
                if doc.file_index != index:
                    break
                yield doc.text


def _tokenizer_for_parts(data_dir: Path) -> Tuple[Any, str]:
    path = data_dir / TOKENIZER
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: run `slm prepare CONFIG --tokenizer-only` once before the parts start."
        )
    return load_tokenizer(path), file_sha256(path)


def prepare_tokenizer_only(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig) -> Path:
    """Train (or copy) tokenizer.json into data.dir, once, before the parts."""
    data_dir = Path(data_cfg.dir)
    with prepare_lock(data_dir):
        if (data_dir / TOKENIZER).is_file():
            say(f"prepare: {data_dir / TOKENIZER} exists; the parts will use it")
        else:
            obtain_tokenizer(data_cfg, tokenizer_cfg, data_dir, resolve_num_proc(data_cfg.num_proc))
    return data_dir / TOKENIZER


def prepare_part(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig, part: int, parts: int) -> Path:
    """Tokenize slice K of N of every source into .parts/K-of-N (restarted from scratch if interrupted)."""
    data_dir = Path(data_cfg.dir)
    names = source_names(data_cfg.sources)
    tokenizer, sha = _tokenizer_for_parts(data_dir)
    dtype = token_dtype(tokenizer_vocab_size(tokenizer))
    folder = data_dir / PARTS / f"{part}-of-{parts}"
    shutil.rmtree(folder, ignore_errors=True)  # ours: a part that did not finish starts again
    folder.mkdir(parents=True)
    encode.init_worker(tokenizer.to_str(), dtype)
    started, tokens = time.time(), 0
    for source, name in zip(data_cfg.sources, names):
        slices = part_slices(source, part, parts)
        documents, replaced = 0, 0
        with open(folder / f"{name}.tokens", "wb") as out:
            for texts in text_chunks(slice_documents(source, slices, data_cfg.encoding_errors), str):
                tokens += _write(out, texts)
                documents += len(texts)
                replaced += sum(t.count("\ufffd") for t in texts)
            out.flush()
            os.fsync(out.fileno())
        atomic_write_json(
            folder / f"{name}.json", {"documents": documents, "replaced_chars": replaced, "slices": slices}
        )
    atomic_write_json(
        folder / DONE,
        {
            "tokenizer_sha256": sha,
            "prepared_from": prepare_fingerprint(data_cfg, tokenizer_cfg),
            "tokens": tokens,
            "seconds": time.time() - started,
        },
    )
    say(f"prepare: part {part}/{parts} wrote {tokens:,} tokens in {time.time() - started:.1f} s to {folder}")
    return folder


def _write(out: Any, texts: List[str]) -> int:
    if not texts:
        return 0
    encoded = encode.encode_chunk(texts, [False] * len(texts))
    out.write(encoded.train.tobytes())
    return len(encoded.train)


def _done_parts(data_dir: Path) -> Tuple[int, List[Path]]:
    folders = sorted((data_dir / PARTS).glob("*-of-*")) if (data_dir / PARTS).is_dir() else []
    counts = {int(f.name.split("-of-")[1]) for f in folders}
    if len(counts) != 1:
        found = sorted(f.name for f in folders) or "none"
        raise DataError(
            f"--merge needs the parts of one --part K/N split in {data_dir / PARTS}; found {found}."
        )
    parts = counts.pop()
    missing = [k for k in range(1, parts + 1) if not (data_dir / PARTS / f"{k}-of-{parts}" / DONE).is_file()]
    if missing:
        raise DataError(
            f"Cannot merge {data_dir}: part(s) {', '.join(map(str, missing))} of {parts} are not done "
            f"(run `slm prepare CONFIG --part K/{parts}` for each)."
        )
    return parts, [data_dir / PARTS / f"{k}-of-{parts}" for k in range(1, parts + 1)]


def merge_parts(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig) -> Path:
    """Cut the parts' streams into the shards and manifest a single prepare would write."""
    data_dir = Path(data_cfg.dir)
    names = source_names(data_cfg.sources)
    with prepare_lock(data_dir):
        if (data_dir / MANIFEST).exists():
            raise DataError(f"{data_dir / MANIFEST} exists already: the data is complete (nothing to merge).")
        parts, folders = _done_parts(data_dir)
        tokenizer, sha = _tokenizer_for_parts(data_dir)
        fingerprint = prepare_fingerprint(data_cfg, tokenizer_cfg)
        for folder in folders:
            done = json.loads((folder / DONE).read_text())
            if done["tokenizer_sha256"] != sha or done["prepared_from"] != fingerprint:
                raise DataError(
                    f"Part {folder} was made with another tokenizer or config than this merge; run it again."
                )
        dtype = token_dtype(tokenizer_vocab_size(tokenizer))
        eot, byte_lengths = eot_id(tokenizer), token_byte_lengths(tokenizer)
        work = data_dir / WORK_DIR
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        records, sources = [], []
        for source, name in zip(data_cfg.sources, names):
            writers = {
                s: ShardWriter(data_dir, work, name, s, dtype, data_cfg.shard_tokens, eot, byte_lengths)
                for s in SPLITS
            }
            counts = {"train": 0, "val": 0}
            index, replaced = 0, 0
            for folder in folders:
                info = json.loads((folder / f"{name}.json").read_text())
                index, split_counts = _merge_stream(
                    folder / f"{name}.tokens", dtype, eot, index, data_cfg.val_fraction, writers, records
                )
                counts = {s: counts[s] + split_counts[s] for s in SPLITS}
                replaced += info["replaced_chars"]
            if index == 1:
                raise DataError(
                    f"Source '{name}' holds a single document, whose tail is its validation split; prepare it "
                    f"without --part."
                )
            records += [r for r in (writers["train"].finish(), writers["val"].finish()) if r]
            sources.append(
                {
                    "name": name,
                    "path": source.path,
                    "documents": index,
                    "train_documents": counts["train"],
                    "val_documents": counts["val"],
                    "val_rule": "interleave",
                    "replaced_chars": replaced,
                }
            )
        manifest = build_manifest(data_dir, data_cfg, tokenizer, sha, sources, records, names, fingerprint)
        write_manifest(manifest)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data_dir / PARTS, ignore_errors=True)
    print(summary_table(manifest))
    say(f"prepare: merged {parts} parts into {data_dir}")
    return data_dir


def _merge_stream(
    path: Path,
    dtype: str,
    eot: int,
    index: int,
    val_fraction: float,
    writers: Dict[str, ShardWriter],
    records: List,
) -> Tuple[int, Dict[str, int]]:
    """Route a part's documents (from global document `index` on) to the train and val writers."""
    stream = open_shard(path, dtype)
    counts = {"train": 0, "val": 0}
    start = 0
    while start < len(stream):
        piece = np.asarray(stream[start : start + MERGE_TOKENS])
        ends = np.flatnonzero(piece == eot)
        if not len(ends):
            raise DataError(f"Part stream {path} does not end with EOT; run that part again.")
        piece = piece[: ends[-1] + 1]
        doc_of_token = np.concatenate([[0], np.cumsum(piece[:-1] == eot)])
        held = validation_mask(index, len(ends), val_fraction)[doc_of_token]
        # Each split keeps the documents' order; train documents are written before val ones within a
        # piece, which does not matter: the two splits are separate streams.
        records += writers["train"].append(piece[~held])
        records += writers["val"].append(piece[held])
        n_val = int(validation_mask(index, len(ends), val_fraction).sum())
        counts["val"] += n_val
        counts["train"] += len(ends) - n_val
        index += len(ends)
        start += len(piece)
    return index, counts
