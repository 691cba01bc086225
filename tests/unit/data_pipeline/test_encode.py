"""The prepare workers' encoder: joining short documents with EOT for speed gives exactly the ids of
encoding every document on its own, and text that spells a special token stays plain text."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.prepare.encode import encode_chunk, init_worker
from data_pipeline.tokenizer import EOT, IM_START
from tests.helpers import SHAKESPEARE


def test_grouped_encoding_equals_per_document_encoding(tiny_data_dir):
    tokenizer_json = (tiny_data_dir / "tokenizer.json").read_text(encoding="utf-8")
    init_worker(tokenizer_json, "uint16")
    paragraphs = open(SHAKESPEARE, encoding="utf-8").read().split("\n\n")[:400]
    awkward = [
        f"a {EOT} b",
        "ends with <|",
        f"{IM_START}user",
        "  leading spaces",
        "\u00e9t\u00e9 \U0001f680",
        "x" * 5000,
    ]
    texts = paragraphs[:150] + awkward + paragraphs[150:]
    is_val = [i % 19 == 18 for i in range(len(texts))]
    chunk = encode_chunk(texts, is_val)

    # The reference: one document at a time, special-token spellings encoded as ordinary text.
    reference = Tokenizer.from_str(tokenizer_json)
    reference.encode_special_tokens = True
    eot_id = reference.token_to_id(EOT)

    def expected(selected):
        ids = []
        for text in selected:
            ids += reference.encode(text, add_special_tokens=False).ids + [eot_id]
        return np.array(ids, dtype=np.uint16)

    train_texts = [t for t, v in zip(texts, is_val) if not v]
    val_texts = [t for t, v in zip(texts, is_val) if v]
    assert chunk.train_documents == len(train_texts) and chunk.val_documents == len(val_texts)
    np.testing.assert_array_equal(chunk.train, expected(train_texts))
    np.testing.assert_array_equal(chunk.val, expected(val_texts))
    assert np.count_nonzero(chunk.train == eot_id) == len(train_texts)  # no forged document boundary
