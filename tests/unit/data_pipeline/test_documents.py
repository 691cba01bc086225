"""Document ids derived from EOT tokens: the values, the model behaviour they give, the loader wrapper."""

from __future__ import annotations

import torch

from data_pipeline.loading.documents import DocumentMaskedLoader, add_document_ids, document_ids_from_eot
from data_pipeline.loading.loader import build_loader
from data_pipeline.tokenizer import eot_id, load_tokenizer
from model import ModelConfig, Transformer

EOT = 0


def test_positions_restart_and_documents_count_at_every_eot():
    tokens = torch.tensor([[5, 6, EOT, 7, 8, 9, EOT, EOT, 4], [EOT, 1, 2, 3, 4, 5, 6, 7, 8]])
    position_ids, doc_ids = document_ids_from_eot(tokens, EOT)
    assert position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert doc_ids.tolist() == [[0, 0, 1, 1, 1, 1, 2, 3, 3], [1] * 9]


def test_a_document_in_a_packed_row_is_computed_as_if_alone():
    torch.manual_seed(0)
    model = (
        Transformer(
            ModelConfig(
                n_layers=2,
                d_model=64,
                n_heads=4,
                n_kv_heads=2,
                vocab_size=50,
                max_seq_len=32,
                attention="sdpa",
            )
        )
        .double()
        .eval()
    )
    gen = torch.Generator().manual_seed(1)
    tail, doc_a, doc_b = (torch.randint(1, 50, (n,), generator=gen) for n in (5, 9, 10))
    row = torch.cat((tail, torch.tensor([EOT]), doc_a, torch.tensor([EOT]), doc_b))[None]  # (1, 26)
    batch = add_document_ids({"input_ids": row, "labels": row}, EOT)
    with torch.no_grad():
        packed = model(row, position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])[0]
        alone = model(torch.cat((torch.tensor([EOT]), doc_b))[None])[0]  # document B as its own sequence
        unmasked = model(row)[0]
    torch.testing.assert_close(packed[:, -11:], alone, rtol=0, atol=1e-10)
    assert (unmasked[:, -11:] - alone).abs().amax() > 1e-3  # without the mask B sees the documents before it


def test_the_loader_wrapper_adds_ids_and_keeps_the_resume_state(tiny_data_dir):
    eot = eot_id(load_tokenizer(tiny_data_dir / "tokenizer.json"))
    plain = build_loader(tiny_data_dir, "train", 64, 4, 0, 1, seed=3)
    wrapped = DocumentMaskedLoader(build_loader(tiny_data_dir, "train", 64, 4, 0, 1, seed=3), eot)
    it = iter(wrapped)
    for _ in range(3):
        expected, got = next(plain), next(it)
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(
            got["labels"], expected["labels"]
        )
        position_ids, doc_ids = document_ids_from_eot(expected["input_ids"], eot)
        assert torch.equal(got["position_ids"], position_ids) and torch.equal(got["doc_ids"], doc_ids)
    assert wrapped.state_dict() == plain.state_dict()  # the trainer checkpoints the wrapped loader's cursor
    assert int((got["input_ids"] == eot).sum()) > 0  # blank-line documents: the batches do hold boundaries
