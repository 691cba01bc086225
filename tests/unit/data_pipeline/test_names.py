"""Source names (shared by the manifest and the trainer's mixing weights), vocab rounding, token dtype."""

from __future__ import annotations

import pytest

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.format.splits import tail_split, validation_mask
from data_pipeline.sources.corpus import looks_local, source_name, source_weights
from data_pipeline.tokenizer import model_vocab_size, token_dtype, train_tokenizer


@pytest.mark.parametrize(
    "source, name",
    [
        (SourceConfig(path="data/tinyshakespeare.txt"), "tinyshakespeare"),
        (SourceConfig(path="corpora/wiki/*.jsonl"), "wiki"),
        (SourceConfig(path="corpora/web/"), "web"),
        (SourceConfig(path="roneneldan/TinyStories"), "TinyStories"),
        (SourceConfig(path="x.txt", name="my code!"), "my_code"),
    ],
)
def test_source_names(source, name):
    assert source_name(source) == name


def test_source_weights_match_manifest_names_and_refuse_duplicates():
    cfg = DataConfig(
        sources=[SourceConfig(path="a/books.txt", weight=3), SourceConfig(path="b/web.jsonl", weight=1)]
    )
    assert source_weights(cfg) == {"books": 3.0, "web": 1.0}
    cfg.sources.append(SourceConfig(path="c/books.parquet"))
    with pytest.raises(
        DataError,
        match=r"data\.sources\[0\] \(a/books\.txt\) and data\.sources\[2\] \(c/books\.parquet\) are both named 'books'",
    ):
        source_weights(cfg)


def test_hub_names_are_not_local_paths():
    assert looks_local("data/missing.txt") and looks_local("./corpus") and looks_local("shards/*.parquet")
    assert not looks_local("roneneldan/TinyStories") and not looks_local("wikitext")


def test_validation_documents_are_spread_evenly():
    mask = validation_mask(0, 1000, 0.05)
    assert mask.sum() == 50 and list(mask.nonzero()[0][:3]) == [19, 39, 59]
    assert (validation_mask(500, 500, 0.05) == mask[500:]).all()
    assert validation_mask(0, 100, 0.0).sum() == 0 and validation_mask(0, 300, 1 / 3).sum() == 100
    text = "line one\nline two\nline three\nthe last line\n"
    cut = tail_split(text, 0.3)
    assert text[cut:] == "the last line\n"


def test_model_vocab_is_rounded_to_64_and_dtype_follows_the_vocabulary():
    tokenizer = train_tokenizer(["hello world, " * 50], vocab_size=300)
    assert tokenizer.get_vocab_size() < 300 and model_vocab_size(tokenizer) % 64 == 0
    assert model_vocab_size(tokenizer) - tokenizer.get_vocab_size() < 64
    assert token_dtype(65_535) == "uint16" and token_dtype(65_536) == "uint32"
