"""`slm prepare`: tokenizer, shards and manifest from real corpora; exact text round trip; resume after a
real kill; byte-identical output for any number of worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.files import file_sha256
from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.format.manifest import load_manifest, manifest_sha256
from data_pipeline.format.shards import ShardWriter, open_shard
from data_pipeline.format.splits import validation_mask
from data_pipeline.prepare.dispatch import prepare
from data_pipeline.tokenizer import (
    EOT,
    IM_END,
    IM_START,
    PAD,
    load_tokenizer,
    model_vocab_size,
    token_byte_lengths,
)
from tests.helpers import REPO, SHAKESPEARE, slm_cmd
from tests.helpers import test_env as subprocess_env

CORPUS = Path(SHAKESPEARE).read_text(encoding="utf-8")


def stream_documents(data_dir: Path, source: str, split: str) -> List[List[int]]:
    """Token ids of each document of a (source, split) stream, read back from its shards."""
    manifest = load_manifest(data_dir)
    parts = [np.asarray(open_shard(data_dir / s.file, s.dtype)) for s in manifest.shards_of(split, source)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(tokens == manifest.eot_id)
    assert len(ends) == 0 or ends[-1] == len(tokens) - 1, "a stream must end with EOT"
    return [part.tolist() for part in np.split(tokens, ends + 1)[:-1]]


def source_documents(data_dir: Path, source: str) -> List[str]:
    """A source's documents in corpus order, decoded from its train and val shards."""
    manifest = load_manifest(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    decode = lambda ids: tokenizer.decode(ids[:-1], skip_special_tokens=False)  # noqa: E731
    train = [decode(d) for d in stream_documents(data_dir, source, "train")]
    val = [decode(d) for d in stream_documents(data_dir, source, "val")]
    info = next(s for s in manifest.sources if s["name"] == source)
    if info["val_rule"] == "tail":
        return [train[0] + val[0]]
    mask = validation_mask(0, len(train) + len(val), manifest.val_fraction)
    train_it, val_it = iter(train), iter(val)
    return [next(val_it) if held else next(train_it) for held in mask]


def data_config(data_dir: Path, sources: List[SourceConfig], **kwargs) -> DataConfig:
    return DataConfig(
        dir=str(data_dir),
        sources=sources,
        shard_tokens=kwargs.pop("shard_tokens", 4096),
        num_proc=kwargs.pop("num_proc", 1),
        **kwargs,
    )


def shard_hashes(data_dir: Path) -> Dict[str, str]:
    return {s.file: s.sha256 for s in load_manifest(data_dir).shards}


def test_tinyshakespeare_round_trip(tiny_data_dir):
    """The tiny preset's prepare: tokenizer, manifest and shards give back the corpus exactly (but separators)."""
    data_dir = Path(tiny_data_dir)
    manifest = load_manifest(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    assert [tokenizer.token_to_id(t) for t in (EOT, IM_START, IM_END, PAD)] == [0, 1, 2, 3]
    assert manifest.tokenizer_sha256 == file_sha256(data_dir / "tokenizer.json")
    assert manifest.dtype == "uint16" and manifest.vocab_size == 4096 and model_vocab_size(tokenizer) == 4096
    assert manifest.shard_tokens == 65536
    assert len(manifest.sources) == 1 and manifest.sources[0]["name"] == "tinyshakespeare"

    documents = source_documents(data_dir, "tinyshakespeare")
    assert "\n\n".join(documents) == CORPUS

    info = manifest.sources[0]
    assert info["documents"] == len(documents) == info["train_documents"] + info["val_documents"]
    assert abs(info["val_documents"] / info["documents"] - 0.05) < 0.001
    for split in ("train", "val"):
        shards = manifest.shards_of(split)
        assert [s.index for s in shards] == list(range(len(shards)))
        assert all(s.tokens == 65536 for s in shards[:-1]) and 0 < shards[-1].tokens <= 65536
        assert sum(s.documents for s in shards) == info[f"{split}_documents"]
        for shard in shards:
            path = data_dir / shard.file
            assert path.stat().st_size == 2 * shard.tokens and file_sha256(path) == shard.sha256
    total_bytes = sum(s.text_bytes for s in manifest.shards)
    assert total_bytes == len(CORPUS.encode("utf-8")) - 2 * (len(documents) - 1)
    assert 2.5 < manifest.bytes_per_token("train") < 5
    assert not (data_dir / ".prepare").exists()


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> Dict[str, Path]:
    """jsonl with a custom field, parquet, and a folder of text files (one document per line)."""
    root = tmp_path_factory.mktemp("corpora")
    paragraphs = [p for p in CORPUS[:120_000].split("\n\n") if p.strip()]
    jsonl = root / "plays.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, p in enumerate(paragraphs[:300]):
            f.write(json.dumps({"id": i, "content": p}) + "\n")
            if i % 50 == 0:
                f.write("\n")  # blank lines in jsonl are allowed
    parquet = root / "more.parquet"
    pq.write_table(pa.table({"text": paragraphs[300:600]}), parquet)
    lines = root / "lines"
    lines.mkdir()
    text_lines = [line for line in CORPUS[120_000:160_000].splitlines() if line.strip()]
    (lines / "a.txt").write_text("\n".join(text_lines[:400]) + "\n", encoding="utf-8")
    (lines / "b.txt").write_text("\n".join(text_lines[400:]) + "\n", encoding="utf-8")
    (root / "single.txt").write_text(CORPUS[200_000:260_000], encoding="utf-8")
    return {
        "jsonl": jsonl,
        "parquet": parquet,
        "lines": lines,
        "single": root / "single.txt",
        "paragraphs": paragraphs,
        "text_lines": text_lines,
    }


@pytest.mark.slow
def test_jsonl_parquet_glob_and_single_document(tmp_path, corpus_files):
    """Every source kind, several sources in one config, and a single-document source giving its tail."""
    sources = [
        SourceConfig(path=str(corpus_files["jsonl"]), text_field="content"),
        SourceConfig(path=str(corpus_files["parquet"])),
        SourceConfig(path=str(corpus_files["lines"] / "*.txt"), doc_boundary="line", name="lines"),
        SourceConfig(path=str(corpus_files["single"]), doc_boundary="file"),
    ]
    cfg = data_config(tmp_path / "data", sources, num_proc=2, val_fraction=0.1)
    prepare(cfg, TokenizerConfig(vocab_size=512))
    manifest = load_manifest(tmp_path / "data")
    assert manifest.source_names() == ["plays", "more", "lines", "single"]
    assert source_documents(tmp_path / "data", "plays") == corpus_files["paragraphs"][:300]
    assert source_documents(tmp_path / "data", "more") == corpus_files["paragraphs"][300:600]
    assert source_documents(tmp_path / "data", "lines") == corpus_files["text_lines"]
    single = next(s for s in manifest.sources if s["name"] == "single")
    assert single["val_rule"] == "tail" and single["documents"] == 1
    assert source_documents(tmp_path / "data", "single") == [CORPUS[200_000:260_000]]
    val_share = manifest.tokens("val", "single") / (
        manifest.tokens("train", "single") + manifest.tokens("val", "single")
    )
    assert 0.05 < val_share < 0.15
    counts = {s["name"]: s["val_documents"] for s in manifest.sources}
    assert counts["plays"] == 30 and counts["more"] == 30


def test_special_token_text_stays_text_and_bad_bytes_are_counted(tmp_path):
    """A document spelling <|endoftext|> is not split by it; data.encoding_errors=replace counts bad bytes."""
    corpus = tmp_path / "odd.txt"
    corpus.write_bytes(
        CORPUS[:20_000].encode() + b"\n\nA line with <|endoftext|> inside.\n\nbad \xff\xfe bytes\n"
    )
    cfg = data_config(
        tmp_path / "data",
        [SourceConfig(path=str(corpus), doc_boundary="blank_line")],
        encoding_errors="replace",
        val_fraction=0.0,
    )
    prepare(cfg, TokenizerConfig(vocab_size=300))
    manifest = load_manifest(tmp_path / "data")
    documents = source_documents(tmp_path / "data", "odd")
    assert documents[-2] == "A line with <|endoftext|> inside."
    assert documents[-1] == "bad \ufffd\ufffd bytes\n"
    assert manifest.sources[0]["replaced_chars"] == 2
    assert manifest.sources[0]["documents"] == len(documents)
    assert manifest.tokens("val") == 0


def test_existing_tokenizer_is_copied_byte_for_byte(tmp_path, tiny_data_dir):
    """tokenizer.path keeps the tokenizer's identity (sha256), so checkpoints and data stay comparable."""
    source = tmp_path / "part.txt"
    source.write_text(CORPUS[:30_000], encoding="utf-8")
    tokenizer = Path(tiny_data_dir) / "tokenizer.json"
    cfg = data_config(tmp_path / "data", [SourceConfig(path=str(source), doc_boundary="blank_line")])
    prepare(cfg, TokenizerConfig(path=str(tokenizer), vocab_size=300))
    assert load_manifest(tmp_path / "data").tokenizer_sha256 == file_sha256(tokenizer)
    assert (tmp_path / "data" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    lengths = token_byte_lengths(load_tokenizer(tokenizer))
    assert lengths[:4].tolist() == [0, 0, 0, 0] and lengths[4:260].min() == 1


def test_complete_prepare_is_a_no_op_and_a_changed_config_is_refused(tmp_path, capsys):
    source = tmp_path / "part.txt"
    source.write_text(CORPUS[:30_000], encoding="utf-8")
    cfg = data_config(tmp_path / "data", [SourceConfig(path=str(source), doc_boundary="blank_line")])
    prepare(cfg, TokenizerConfig(vocab_size=300))
    before = manifest_sha256(tmp_path / "data")
    capsys.readouterr()
    prepare(cfg, TokenizerConfig(vocab_size=300))
    assert "already complete" in capsys.readouterr().err
    assert manifest_sha256(tmp_path / "data") == before
    cfg.shard_tokens = 1024
    with pytest.raises(DataError, match=r"manifest\.json.*shard_tokens: was 4096, now 1024"):
        prepare(cfg, TokenizerConfig(vocab_size=300))


@pytest.mark.slow
def test_killed_prepare_resumes_without_loss_or_duplication(tmp_path, capsys):
    """A real `slm prepare` killed with SIGKILL mid-way; the rerun continues from its last commit and the
    result is byte-identical to an uninterrupted prepare (run with 2 worker processes instead of 1)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    tokenizer_dir = tmp_path / "tokenizer"
    prepare(
        data_config(tokenizer_dir, [SourceConfig(path=str(corpus), doc_boundary="line")]),
        TokenizerConfig(vocab_size=512, max_train_docs=2000),
    )
    tokenizer = str(tokenizer_dir / "tokenizer.json")

    killed = tmp_path / "killed"
    args = [
        "prepare",
        str(REPO / "configs" / "tiny.yaml"),
        f"data.dir={killed}",
        "data.num_proc=1",
        "data.shard_tokens=16384",
        f"tokenizer.path={tokenizer}",
        f"data.sources=[{{path: {corpus}, doc_boundary: line}}]",
    ]
    env = subprocess_env({"SLM_PREPARE_CHUNK_BYTES": "16384", "SLM_PREPARE_COMMIT_SECONDS": "0"})
    proc = subprocess.Popen(
        slm_cmd(args), env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    state = killed / ".prepare" / "state.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["source"]["documents"] > 0:
                break
            time.sleep(0.005)
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == -signal.SIGKILL, f"prepare ended before it could be killed:\n{out}"
    assert not (killed / "manifest.json").exists()
    committed = json.loads(state.read_text())["source"]["documents"]
    assert 0 < committed

    resumed_cfg = data_config(
        killed, [SourceConfig(path=str(corpus), doc_boundary="line")], shard_tokens=16384, num_proc=2
    )
    capsys.readouterr()
    prepare(resumed_cfg, TokenizerConfig(path=tokenizer))
    out = capsys.readouterr().err
    assert "resuming an interrupted prepare" in out and f"{committed:,} documents" in out
    prepare(resumed_cfg, TokenizerConfig(path=tokenizer))
    assert "already complete" in capsys.readouterr().err

    reference = tmp_path / "reference"
    prepare(
        data_config(
            reference, [SourceConfig(path=str(corpus), doc_boundary="line")], shard_tokens=16384, num_proc=2
        ),
        TokenizerConfig(path=tokenizer),
    )
    assert shard_hashes(killed) == shard_hashes(reference)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
    documents = source_documents(killed, "corpus")
    assert documents == [line for line in CORPUS.split("\n") if line.strip()]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_shard_writer_returns_to_its_last_commit(tmp_path, dtype):
    """The crash cases the kill test may or may not hit: shards sealed and partial tokens written after the
    last commit are undone, including a shard already renamed to its final name."""
    data_dir, work_dir = tmp_path / "data", tmp_path / "data" / ".prepare"
    data_dir.mkdir()
    lengths = np.ones(32, dtype=np.int64)

    def writer(index: int = 0) -> ShardWriter:
        return ShardWriter(
            data_dir, work_dir, "src", "train", dtype, 10, eot_id=0, byte_lengths=lengths, index=index
        )

    first = writer()
    sealed = first.append(np.arange(1, 13).astype(dtype))
    assert [s.file for s in sealed] == ["src-train-00000.bin"] and sealed[0].tokens == 10
    assert sealed[0].text_bytes == 10 and sealed[0].documents == 0
    first.sync()
    committed = {s.file for s in sealed}  # commit: shard 0 journaled, 2 tokens in the partial shard 1
    first.append(np.arange(1, 20).astype(dtype))  # then seals shards 1 and 2 and crashes
    first.close()
    assert (data_dir / "src-train-00002.bin").exists()

    again = writer(index=1)
    again.recover(committed_tokens=2, journaled=committed)
    assert not (data_dir / "src-train-00001.bin").exists() and not (data_dir / "src-train-00002.bin").exists()
    little_endian = np.dtype(dtype).newbyteorder("<")
    assert again.partial_path.read_bytes() == np.array([11, 12], dtype=little_endian).tobytes()
    sealed = again.append(np.arange(13, 21).astype(dtype))
    assert np.array_equal(np.fromfile(data_dir / sealed[0].file, dtype=little_endian), np.arange(11, 21))
    assert np.array_equal(open_shard(data_dir / sealed[0].file, dtype), np.arange(11, 21))
    with pytest.raises(DataError, match="src-train-00002.bin.partial"):
        writer(index=2).recover(committed_tokens=5, journaled=committed)


def test_tokenizer_of_a_single_document_never_sees_its_validation_tail(tmp_path):
    """A word that occurs only in the tail (the validation split) is not learned as a token; in the head it is."""
    filler = " Qwzxjvk" * 300  # 2,400 characters, inside the last 10% when appended
    for word_in, name in (("tail", "a"), ("head", "b")):
        text = CORPUS[:100_000] + filler if word_in == "tail" else filler + CORPUS[:100_000]
        path = tmp_path / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        cfg = data_config(
            tmp_path / f"data_{name}",
            [SourceConfig(path=str(path), doc_boundary="file")],
            num_proc=1,
            val_fraction=0.1,
        )
        prepare(cfg, TokenizerConfig(vocab_size=1024))
        tokens = load_tokenizer(tmp_path / f"data_{name}" / "tokenizer.json").encode(" Qwzxjvk").ids
        if word_in == "tail":
            assert len(tokens) > 2, tokens  # byte-level pieces: the tail never reached the trainer
        else:
            assert len(tokens) == 1, tokens
