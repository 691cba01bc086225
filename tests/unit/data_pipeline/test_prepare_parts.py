"""Prepare on many nodes: --tokenizer-only, then --part K/N, then --merge gives the same shards (bytes and
sha256) and the same manifest as a single-process prepare; a merge with a part missing names it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare.dispatch import prepare
from tests.helpers import REPO, SHAKESPEARE, run, slm_cmd

CORPUS = Path(SHAKESPEARE).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two sources: a folder of 7 text files of uneven size (one document per line), and one more file."""
    root = tmp_path_factory.mktemp("parts_corpus")
    folder = root / "plays"
    folder.mkdir()
    lines = [line for line in CORPUS[:300_000].splitlines() if line.strip()]
    cuts = [0, 400, 900, 1000, 2500, 3100, 4200, len(lines)]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        (folder / f"{i}.txt").write_text("\n".join(lines[a:b]) + "\n", encoding="utf-8")
    (root / "tail.txt").write_text(CORPUS[300_000:400_000], encoding="utf-8")
    # One big file of one document per line, cut inside by byte range: CRLF, lone CR, blank lines, non-ASCII.
    endings = ["\n", "\r\n", "\n\n", "\r", " \u2028 é\n"]
    big = "".join(line + endings[i % len(endings)] for i, line in enumerate(lines[:3000]))
    (root / "big.txt").write_bytes(big.encode("utf-8"))
    return [
        SourceConfig(path=str(folder), doc_boundary="line"),
        SourceConfig(path=str(root / "tail.txt"), doc_boundary="blank_line"),
        SourceConfig(path=str(root / "big.txt"), doc_boundary="line"),
    ]


def config(data_dir: Path, sources) -> DataConfig:
    return DataConfig(dir=str(data_dir), sources=sources, shard_tokens=5000, num_proc=1, val_fraction=0.05)


def contents(data_dir: Path):
    files = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    return files, json.loads(files.pop("manifest.json"))


def test_parts_and_merge_equal_a_single_prepare(tmp_path, sources):
    tokenizer = TokenizerConfig(vocab_size=400)
    single = config(tmp_path / "single", sources)
    prepare(single, tokenizer)
    parted = config(tmp_path / "parted", sources)
    prepare(parted, tokenizer, tokenizer_only=True)
    assert (tmp_path / "parted" / "tokenizer.json").read_bytes() == (
        tmp_path / "single" / "tokenizer.json"
    ).read_bytes()
    for k in (3, 1):
        prepare(parted, tokenizer, part=f"{k}/3")
    with pytest.raises(DataError, match=r"part\(s\) 2 of 3 are not done"):
        prepare(parted, tokenizer, merge=True)
    prepare(parted, tokenizer, part="2/3")
    prepare(parted, tokenizer, merge=True)
    (single_files, single_manifest), (parted_files, parted_manifest) = (
        contents(tmp_path / "single"),
        contents(tmp_path / "parted"),
    )
    assert len(single_manifest["shards"]) > 10 and {s["source"] for s in single_manifest["shards"]} == {
        "plays",
        "tail",
        "big",
    }
    assert parted_manifest == single_manifest  # shard sha256, counts, sources, fingerprint: all equal
    assert parted_files == single_files  # every shard byte for byte, and the tokenizer
    assert not (tmp_path / "parted" / ".parts").exists()


def test_parts_through_the_cli(tmp_path, sources):
    """The same through `slm prepare` (2 parts), ending in a dataset a second plain prepare finds complete.

    Slow (about 30 s on 2 busy cores): five `slm prepare` processes (tokenizer, two parts, merge, the check), each
    a fresh Python start-up; the separate processes are what the CLI path is about."""
    data_dir = tmp_path / "data"
    over = [
        f"data.dir={data_dir}",
        "data.num_proc=1",
        "data.shard_tokens=5000",
        "tokenizer.vocab_size=400",
        "data.sources=["
        + ", ".join(f"{{path: {s.path}, doc_boundary: {s.doc_boundary}}}" for s in sources)
        + "]",
    ]
    base = ["prepare", str(REPO / "configs" / "tiny.yaml"), *over]
    run(slm_cmd([*base, "--tokenizer-only"]))
    for k in (1, 2):
        assert f"part {k}/2 wrote" in run(slm_cmd([*base, "--part", f"{k}/2"])).stderr
    assert "merged 2 parts" in run(slm_cmd([*base, "--merge"])).stderr
    assert "already complete" in run(slm_cmd(base)).stderr


def test_a_big_line_file_is_cut_on_line_boundaries(sources):
    from data_pipeline.prepare.parts import part_slices, slice_documents
    from data_pipeline.sources.corpus import iter_documents

    big = sources[2]
    whole = [d.text for d in iter_documents(big)]  # what a single prepare reads (through `datasets`)
    cut = [part_slices(big, k, 3) for k in (1, 2, 3)]
    assert (
        all(len(s) == 1 and s[0][0] == 0 for s in cut) and cut[0][0][2] == cut[1][0][1] > 0
    )  # 3 ranges of one file
    assert [t for s in cut for t in slice_documents(big, s, "strict")] == whole


def test_bad_part_is_refused(tmp_path, sources):
    cfg = config(tmp_path / "d", sources)
    with pytest.raises(DataError, match=r"--part '4/3': expected K/N with 1 <= K <= N"):
        prepare(cfg, TokenizerConfig(vocab_size=400), part="4/3")
    with pytest.raises(
        DataError, match=r"tokenizer\.json does not exist: run `slm prepare CONFIG --tokenizer-only`"
    ):
        prepare(replace(cfg, dir=str(tmp_path / "e")), TokenizerConfig(vocab_size=400), part="1/3")
