"""The engine of `slm prepare` (local.py starts it): raw sources -> token shards + manifest.json in a local folder.

The main process streams documents, cuts them into chunks of ~CHUNK_BYTES of text in a fixed order, and
hands them to `data.num_proc` tokenizer processes; results come back in order and are appended to the
shards of their (source, split). Because the chunking never depends on the number of workers, the output
is byte-identical for any `num_proc`.

Resuming: at a chunk boundary (at most every COMMIT_SECONDS) the shard tails are fsynced and
`.prepare/state.json` is replaced atomically with the position of the next document and the committed
length of every partial shard; finished shards are journaled in `.prepare/shards.jsonl`. An interrupted prepare restarts from the last commit,
cutting anything written after it, so no document is lost or duplicated. The manifest is written last;
when it exists and matches the config, prepare says the data is already complete and does nothing.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from tokenizers import Tokenizer
from tqdm import tqdm

from common import faults
from common.atomic import atomic_write_json
from common.files import fsync_dir
from common.log import say
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.format.manifest import FORMAT_VERSION, Manifest, summary_table, write_manifest
from data_pipeline.format.names import JOURNAL, SPLITS, STATE, TOKENIZER, WORK_DIR
from data_pipeline.format.shards import ShardRecord, ShardWriter
from data_pipeline.format.splits import tail_split, validation_mask
from data_pipeline.prepare import encode
from data_pipeline.prepare.common import build_manifest, read_journal, read_prepare_state, text_chunks
from data_pipeline.prepare.tokenizer import empty_source
from data_pipeline.sources.corpus import iter_documents, resolve_files, source_names
from data_pipeline.tokenizer import (
    eot_id,
    model_vocab_size,
    token_byte_lengths,
    token_dtype,
    tokenizer_vocab_size,
)

COMMIT_SECONDS = 2.0
"""Commit (fsync + state) after a chunk at most this often: a crash redoes at most this much work."""


@dataclass
class Chunk:
    texts: List[str]
    is_val: List[bool]
    end: Tuple[int, int]
    """Position (file index, row) of the document after the chunk's last one: where a resume starts."""
    documents: int
    """Source documents consumed (a single document split into head and tail counts once)."""
    chars: int


@dataclass
class SourceProgress:
    """Counters of the source being prepared; saved with every commit."""

    documents: int = 0
    train_documents: int = 0
    val_documents: int = 0
    replaced_chars: int = 0
    val_rule: str = "interleave"
    position: Tuple[int, int] = (0, 0)
    partial: Dict[str, Dict[str, int]] = field(
        default_factory=lambda: {s: {"index": 0, "tokens": 0} for s in SPLITS}
    )


class _Ready:
    """The result of a chunk encoded in this process (same interface as multiprocessing's AsyncResult)."""

    def __init__(self, value: encode.EncodedChunk):
        self.value = value

    def get(self) -> encode.EncodedChunk:
        return self.value


class PrepareRun:
    """One prepare of data_dir, from its start or from the last commit of an interrupted one."""

    def __init__(
        self,
        data_cfg: DataConfig,
        data_dir: Path,
        tokenizer: Tokenizer,
        tokenizer_sha: str,
        fingerprint: Dict[str, Any],
        num_proc: int,
    ):
        self.cfg, self.data_dir, self.tokenizer = data_cfg, data_dir, tokenizer
        self.tokenizer_sha, self.fingerprint, self.num_proc = tokenizer_sha, fingerprint, num_proc
        self.names = source_names(data_cfg.sources)
        self.work_dir = data_dir / WORK_DIR
        self.dtype = token_dtype(tokenizer_vocab_size(tokenizer))
        self.eot_id = eot_id(tokenizer)
        self.byte_lengths = token_byte_lengths(tokenizer)
        self.records: List[ShardRecord] = []
        self.sources_done: List[Dict[str, Any]] = []
        self.source_index = 0
        self.progress = SourceProgress()
        self.writers: Dict[str, ShardWriter] = {}
        self.journal: Any = None
        self.tokens_this_run = 0
        self.last_commit = 0.0
        self.publisher: Any = None
        """Uploads each sealed shard before it is journaled, and the manifest (instead of writing it here)."""

    # --- state -------------------------------------------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        p = self.progress
        return {
            "format_version": FORMAT_VERSION,
            "prepared_from": self.fingerprint,
            "tokenizer_sha256": self.tokenizer_sha,
            "journal_bytes": self.journal.tell(),
            "sources_done": self.sources_done,
            "source_index": self.source_index,
            "source": {
                "documents": p.documents,
                "train_documents": p.train_documents,
                "val_documents": p.val_documents,
                "replaced_chars": p.replaced_chars,
                "val_rule": p.val_rule,
                "position": list(p.position),
                "partial": {
                    s: {"index": w.index, "tokens": w.partial_tokens} for s, w in self.writers.items()
                },
            },
        }

    def _commit(self) -> None:
        for writer in self.writers.values():
            writer.sync()
        self.journal.flush()
        os.fsync(self.journal.fileno())
        fsync_dir(self.data_dir)
        atomic_write_json(self.work_dir / STATE, self._state())
        self.last_commit = time.time()
        if self.publisher is not None:
            self.publisher.committed(
                self.work_dir
            )  # journaled for good: local copies of uploaded shards may go

    def _journal(self, records: List[ShardRecord]) -> None:
        for record in records:
            if self.publisher is not None:
                self.publisher.shard(self.data_dir / record.file)
            self.journal.write((json.dumps(record.to_dict()) + "\n").encode("utf-8"))
            self.records.append(record)

    def _new_writers(self, partial: Dict[str, Dict[str, int]]) -> None:
        name = self.names[self.source_index]
        journaled = {r.file for r in self.records}
        self.writers = {}
        for split in SPLITS:
            writer = ShardWriter(
                self.data_dir,
                self.work_dir,
                name,
                split,
                self.dtype,
                self.cfg.shard_tokens,
                self.eot_id,
                self.byte_lengths,
                index=partial[split]["index"],
            )
            writer.recover(partial[split]["tokens"], journaled)
            self.writers[split] = writer

    def _start(self) -> None:
        """Begin afresh, or return to the last commit of an interrupted prepare."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state_path, journal_path = self.work_dir / STATE, self.work_dir / JOURNAL
        if not state_path.exists():
            shutil.rmtree(self.work_dir)
            self.work_dir.mkdir()
            self.journal = open(journal_path, "ab")
            self._new_writers(SourceProgress().partial)
            self._commit()
            return
        state = read_prepare_state(state_path)
        if not journal_path.exists() or journal_path.stat().st_size < state["journal_bytes"]:
            raise DataError(
                f"Cannot resume prepare: the shard journal {journal_path} is shorter than {state_path} "
                f"records; the folder was modified. Delete {self.data_dir} and prepare again."
            )
        with open(journal_path, "r+b") as f:
            f.truncate(state["journal_bytes"])
        self.records = read_journal(journal_path)
        self.journal = open(journal_path, "ab")
        self.sources_done = state["sources_done"]
        self.source_index = state["source_index"]
        s = state["source"]
        self.progress = SourceProgress(
            s["documents"],
            s["train_documents"],
            s["val_documents"],
            s["replaced_chars"],
            s["val_rule"],
            tuple(s["position"]),
            s["partial"],
        )
        if self.source_index < len(self.names):
            self._new_writers(self.progress.partial)
        done_tokens = sum(r.tokens for r in self.records) + sum(
            w.partial_tokens for w in self.writers.values()
        )
        say(
            f"prepare: resuming an interrupted prepare of {self.data_dir}: {len(self.sources_done)} of "
            f"{len(self.names)} sources done, {self.progress.documents:,} documents of source "
            f"'{self.names[min(self.source_index, len(self.names) - 1)]}' committed, {done_tokens:,} tokens kept"
        )

    # --- chunks ------------------------------------------------------------------------------------
    def _chunks(self, source: SourceConfig) -> Iterator[Chunk]:
        p = self.progress
        docs = iter_documents(source, self.cfg.encoding_errors, start=p.position)
        if p.documents == 0:
            first, second = next(docs, None), None
            if first is None:
                raise empty_source(source)
            second = next(docs, None)
            if second is None:  # a single document: its tail is the validation split
                cut = tail_split(first.text, self.cfg.val_fraction)
                end = (first.file_index, first.row + 1)
                if cut:
                    p.val_rule = "tail"
                    yield Chunk([first.text[:cut], first.text[cut:]], [False, True], end, 1, len(first.text))
                else:
                    yield Chunk([first.text], [False], end, 1, len(first.text))
                return
            docs = chain([first, second], docs)
        index = p.documents
        for docs_of_chunk in text_chunks(docs, lambda doc: doc.text):
            texts = [doc.text for doc in docs_of_chunk]
            last = docs_of_chunk[-1]
            yield Chunk(
                texts,
                validation_mask(index, len(texts), self.cfg.val_fraction).tolist(),
                (last.file_index, last.row + 1),
                len(texts),
                sum(len(text) for text in texts),
            )
            index += len(texts)

    def _apply(self, chunk: Chunk, encoded: encode.EncodedChunk) -> None:
        self._journal(self.writers["train"].append(encoded.train))
        self._journal(self.writers["val"].append(encoded.val))
        p = self.progress
        p.documents += chunk.documents
        p.train_documents += encoded.train_documents
        p.val_documents += encoded.val_documents
        p.replaced_chars += encoded.replaced_chars
        p.position = chunk.end
        if time.time() - self.last_commit >= faults.prepare_commit_seconds(COMMIT_SECONDS):
            self._commit()
        self.tokens_this_run += len(encoded.train) + len(encoded.val)

    def _finish_source(self) -> None:
        for writer in self.writers.values():
            record = writer.finish()
            if record:
                self._journal([record])
        p, name = self.progress, self.names[self.source_index]
        self.sources_done.append(
            {
                "name": name,
                "path": self.cfg.sources[self.source_index].path,
                "documents": p.documents,
                "train_documents": p.train_documents,
                "val_documents": p.val_documents,
                "val_rule": p.val_rule,
                "replaced_chars": p.replaced_chars,
            }
        )
        if p.replaced_chars:
            say(
                f"prepare: source '{name}': {p.replaced_chars:,} bytes that were not UTF-8 replaced by U+FFFD"
            )
        self.source_index += 1
        self.progress = SourceProgress()
        if self.source_index < len(self.names):
            self._new_writers(self.progress.partial)
        else:
            self.writers = {}
        self._commit()

    # --- main loop ---------------------------------------------------------------------------------
    def run(self) -> Manifest:
        started = time.time()
        self._start()
        tokenizer_json = self.tokenizer.to_str()
        pool = None
        if self.num_proc > 1:
            gc.freeze()  # forked workers then never touch (and copy) the parent's objects when they collect
            pool = get_context("fork" if sys.platform == "linux" else "spawn").Pool(
                self.num_proc, initializer=encode.init_worker, initargs=(tokenizer_json, self.dtype, True)
            )
            gc.unfreeze()
        else:
            encode.init_worker(tokenizer_json, self.dtype)
        total = sum(f.stat().st_size for s in self.cfg.sources for f in resolve_files(s)) or None
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="prepare",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        documents = 0
        try:
            while self.source_index < len(self.names):
                source = self.cfg.sources[self.source_index]
                inflight: deque = deque()
                chunks = self._chunks(source)
                exhausted = False
                while True:
                    while not exhausted and len(inflight) < 2 * self.num_proc:
                        chunk = next(chunks, None)
                        if chunk is None:
                            exhausted = True
                        elif pool is None:
                            inflight.append((chunk, _Ready(encode.encode_chunk(chunk.texts, chunk.is_val))))
                        else:
                            inflight.append(
                                (chunk, pool.apply_async(encode.encode_chunk, (chunk.texts, chunk.is_val)))
                            )
                    if not inflight:
                        break
                    chunk, result = inflight.popleft()
                    self._apply(chunk, result.get())
                    documents += chunk.documents
                    elapsed = max(time.time() - started, 1e-9)
                    bar.update(chunk.chars)
                    bar.set_postfix_str(
                        f"{self.names[self.source_index]}: {documents:,} docs, "
                        f"{self.tokens_this_run:,} tokens, {self.tokens_this_run / elapsed:,.0f} tokens/s",
                        refresh=False,
                    )
                self._finish_source()
        except KeyboardInterrupt:
            say(
                f"prepare: interrupted; run the same command again to resume from the last commit "
                f"({self.data_dir / WORK_DIR / STATE})."
            )
            raise
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
            for writer in self.writers.values():
                writer.close()
            self.journal.close()
        return self._write_manifest(started)

    def _write_manifest(self, started: float) -> Manifest:
        """The manifest, written last (its presence marks a complete prepare), and the summary printed."""
        manifest = build_manifest(
            self.data_dir,
            self.cfg,
            self.tokenizer,
            self.tokenizer_sha,
            self.sources_done,
            self.records,
            self.names,
            self.fingerprint,
        )
        if self.publisher is None:
            write_manifest(manifest)
        else:
            self.publisher.manifest(manifest)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        elapsed = time.time() - started
        print(summary_table(manifest))
        where = self.publisher.store if self.publisher is not None else self.data_dir
        say(
            f"prepare: wrote {where} in {elapsed:.1f} s ({self.tokens_this_run / max(elapsed, 1e-9):,.0f} tokens/s "
            f"with {self.num_proc} tokenizer process{'es' if self.num_proc > 1 else ''}); "
            f"tokenizer {TOKENIZER} sha256 {self.tokenizer_sha[:16]}..., model vocab_size {model_vocab_size(self.tokenizer)}"
        )
        return manifest
