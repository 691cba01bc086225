"""Bad input to `slm prepare`: one clear DataError naming the file (and line for jsonl), never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare.dispatch import prepare
from data_pipeline.tokenizer import train_tokenizer
from tests.helpers import SHAKESPEARE, TINY, run, slm_cmd, slm_in_process

TEXT = Path(SHAKESPEARE).read_text(encoding="utf-8")[:20_000]


def prepare_source(tmp_path: Path, source: SourceConfig, vocab_size: int = 300, **tokenizer) -> None:
    cfg = DataConfig(dir=str(tmp_path / "data"), sources=[source], shard_tokens=4096, num_proc=1)
    prepare(cfg, TokenizerConfig(vocab_size=vocab_size, **tokenizer))


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


BAD_CORPORA = [
    ("empty.txt", b"\n\n   \n\n", {"doc_boundary": "blank_line"}, r"empty\.txt holds no documents"),
    (
        "latin1.txt",
        TEXT[:500].encode() + b"\n\ncaf\xe9 au lait\n",
        {"doc_boundary": "blank_line"},
        r"latin1\.txt is not valid UTF-8.*data\.encoding_errors=replace",
    ),
    (
        "broken.jsonl",
        b'{"text": "one"}\n{"text": "two"\n{"text": "three"}\n',
        {},
        r"broken\.jsonl:2: not valid JSON",
    ),
    ("latin1.jsonl", b'{"text": "one"}\n\n{"text": "caf\xe9"}\n', {}, r"latin1\.jsonl:3: not valid UTF-8"),
    (
        "fields.jsonl",
        b'{"text": "one"}\n\n{"body": "two"}\n',
        {},
        r"fields\.jsonl:3: field 'text' is missing",
    ),
    (
        "other.jsonl",
        b'{"body": "one"}\n{"body": "two"}\n',
        {},
        r"other\.jsonl:1: no field 'text' \(fields: body\)",
    ),
    (
        "numbers.jsonl",
        b'{"text": "one"}\n{"text": 2}\n',
        {},
        r"numbers\.jsonl:2: field 'text' is of type int",
    ),
]


@pytest.mark.parametrize("name, data, source, needle", BAD_CORPORA, ids=[case[0] for case in BAD_CORPORA])
def test_bad_corpus_names_the_file(tmp_path, name, data, source, needle):
    path = write(tmp_path / "corpus" / name, data)
    with pytest.raises(DataError, match=needle):
        prepare_source(tmp_path, SourceConfig(path=path, **source))


@pytest.mark.parametrize("pattern", ["missing.txt", "nothing/*.jsonl", "folder"])
def test_path_or_glob_matching_nothing(tmp_path, pattern):
    (tmp_path / "folder").mkdir()
    path = str(tmp_path / pattern)
    with pytest.raises(DataError, match=rf"{re.escape(path)}.*(does not exist|matches no files)"):
        prepare_source(tmp_path, SourceConfig(path=path))


def test_vocabulary_too_small_for_the_special_tokens(tmp_path):
    path = write(tmp_path / "ok.txt", TEXT.encode())
    with pytest.raises(
        DataError,
        match=rf"vocab_size=200 is too small for the tokenizer {tmp_path / 'data' / 'tokenizer.json'}.*at least 260",
    ):
        prepare_source(tmp_path, SourceConfig(path=path), vocab_size=200)


def test_data_dir_prepared_with_another_tokenizer(tmp_path):
    path = write(tmp_path / "ok.txt", TEXT.encode())
    prepare_source(tmp_path, SourceConfig(path=path, doc_boundary="blank_line"))
    other = train_tokenizer([TEXT[::-1]], vocab_size=280)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(
        DataError, match=rf"{tmp_path / 'data' / 'manifest.json'} was made with another tokenizer"
    ):
        prepare_source(
            tmp_path, SourceConfig(path=path, doc_boundary="blank_line"), path=str(tmp_path / "other.json")
        )


def test_tokenizer_without_the_special_tokens(tmp_path):
    path = write(tmp_path / "ok.txt", TEXT.encode())
    gpt2_like = Tokenizer(models.BPE())
    gpt2_like.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2_like.train_from_iterator(
        [TEXT], trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False)
    )
    gpt2_like.save(str(tmp_path / "gpt2_like.json"))
    with pytest.raises(
        DataError,
        match=rf"{tmp_path / 'gpt2_like.json'} lacks the special token\(s\) <\|im_start\|>, "
        r"<\|im_end\|>, <\|pad\|>",
    ):
        prepare_source(tmp_path, SourceConfig(path=path), path=str(tmp_path / "gpt2_like.json"))


def test_cli_prints_one_line_without_traceback(tmp_path, capsys):
    """`slm prepare` in this process (slm_in_process): the refusal comes before any data is read."""
    missing = tmp_path / "nowhere" / "corpus.txt"
    code, _, err = slm_in_process(
        capsys, "prepare", TINY, f"data.dir={tmp_path / 'data'}", f"data.sources=[{{path: {missing}}}]"
    )
    assert code == 2
    assert err.startswith("error: ") and str(missing) in err
    assert "Traceback" not in err


def test_overlong_document_is_refused_naming_file_and_line(tmp_path, monkeypatch):
    import data_pipeline.sources.base as base

    monkeypatch.setattr(base, "MAX_DOCUMENT_CHARS", 1000)
    path = write(tmp_path / "long.jsonl", b'{"text": "short"}\n\n{"text": "' + b"word " * 300 + b'"}\n')
    with pytest.raises(DataError, match=r"long\.jsonl:3: a document of 1,500 characters.*at most 1,000"):
        prepare_source(tmp_path, SourceConfig(path=path))


@pytest.mark.slow
def test_48mb_single_record_is_refused_in_bounded_memory(tmp_path):
    """A 48 MB one-line jsonl (issue 21: prepare peaked at 8 GB) gets the clear refusal, and the whole command
    stays under 1.5 GB RSS (measured in a fresh parent so other tests' children do not count). ~20 s."""
    import json
    import sys

    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "word " * 9_600_000}) + "\n", encoding="utf-8")
    cmd = slm_cmd(["prepare", TINY, f"data.dir={tmp_path / 'data'}", f"data.sources=[{{path: {big}}}]"])
    probe = (
        "import resource, subprocess, sys; "
        f"p = subprocess.run({cmd!r}, capture_output=True, text=True); "
        "sys.stderr.write(p.stderr); "
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    proc = run([sys.executable, "-c", probe])
    code, peak_kib = map(int, proc.stdout.split())
    assert code == 2 and "Traceback" not in proc.stderr
    assert re.search(rf"error: {re.escape(str(big))}:1: a document of 48,000,000 characters", proc.stderr)
    assert peak_kib < 1.5 * 2**20, f"peak RSS {peak_kib / 2**20:.2f} GiB"
