"""Instruction data: the three jsonl formats, split, packing, the loader (the chat template: test_chat.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.config import InstructConfig
from data_pipeline.errors import DataError
from data_pipeline.instruct.chat import format_chat
from data_pipeline.instruct.data import (
    build_instruct_loader,
    build_rows,
    read_conversations,
    split_conversations,
)
from data_pipeline.tokenizer import EOT, PAD, load_tokenizer
from model.loss import IGNORE_INDEX
from tests.helpers import SELF_INSTRUCT
from tests.unit.data_pipeline.test_chat import TWO_TURNS


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_tokenizer(tiny_data_dir / "tokenizer.json")


def write_jsonl(path: Path, records) -> str:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8"
    )
    return str(path)


def test_three_jsonl_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "output": "Hi!"},
            "",
            {
                "instruction": "Translate to French.",
                "instances": [{"input": "cat", "output": "chat"}, {"input": "dog", "output": "chien"}],
            },
        ],
    )
    conversations = read_conversations(path)
    assert len(conversations) == 5  # the self-instruct record gives one example per instance
    assert conversations[0][0] == {"role": "system", "content": "S"}
    assert conversations[1] == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert conversations[2][0]["content"] == "Say hi."
    assert conversations[4] == [
        {"role": "user", "content": "Translate to French.\n\ndog"},
        {"role": "assistant", "content": "chien"},
    ]


@pytest.mark.parametrize(
    "record, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        (
            {"prompt": "x", "completion": "y"},
            r"bad\.jsonl:2: unrecognized record with keys \['completion', 'prompt'\]",
        ),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"bad\.jsonl:2: messages\[0\]\.role is 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"bad\.jsonl:2: no assistant message"),
        (
            {"instruction": "x", "instances": [{"input": "y"}]},
            r"bad\.jsonl:2: instances\[0\]: missing field 'output'",
        ),
        ({"instruction": 3, "output": "y"}, r"bad\.jsonl:2: field 'instruction' is a int; expected a string"),
        (
            {"instruction": "x", "output": "y<|endoftext|>"},
            r"bad\.jsonl:2: the assistant message contains the reserved token",
        ),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, record])
    with pytest.raises(DataError, match=message):
        read_conversations(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"does not exist \(config key ift.paths\)"):
        read_conversations(str(tmp_path / "nope.jsonl"))


def test_bundled_self_instruct_split_is_deterministic_and_disjoint():
    conversations = read_conversations(SELF_INSTRUCT)
    assert len(conversations) >= 175
    train = split_conversations(conversations, "train", 0.05)
    val = split_conversations(conversations, "val", 0.05)
    assert len(train) + len(val) == len(conversations) and 1 <= len(val) < len(conversations) // 5
    as_keys = lambda convs: {json.dumps(c, sort_keys=True) for c in convs}  # noqa: E731
    assert not as_keys(train) & as_keys(val)
    assert as_keys(split_conversations(conversations[::-1], "val", 0.05)) == as_keys(val)  # order-independent
    assert len(split_conversations(conversations[:3], "val", 0.01)) == 1  # never an empty val split


def _example(n_prompt: int, n_answer: int, start: int):
    ids = list(range(start, start + n_prompt + n_answer))
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def test_packing_keeps_examples_apart():
    examples = [_example(3, 4, 100), _example(5, 2, 200), _example(2, 6, 300), _example(4, 4, 400)]
    rows, stats = build_rows(examples, seq_len=16, packing=True, overlong="truncate", pad_id=3, seed=0)
    assert rows.shape[1:] == (4, 16) and stats.rows == len(rows) < len(examples)
    seen = []
    for input_ids, labels, positions, docs in rows.tolist():
        for doc in sorted(set(docs)):
            where = [i for i, d in enumerate(docs) if d == doc]
            assert where == list(range(where[0], where[-1] + 1))  # contiguous
            assert [positions[i] for i in where] == list(range(len(where)))  # positions restart
            inputs, targets = [input_ids[i] for i in where], [labels[i] for i in where]
            if inputs[0] == 3:  # padding: no loss
                assert set(targets) == {IGNORE_INDEX}
                continue
            original = next(e for e in examples if e[0][0] == inputs[0])
            assert (
                inputs == original[0][:-1] and targets == original[1][1:]
            )  # shifted inside the example only
            seen.append(inputs[0])
    assert sorted(seen) == [100, 200, 300, 400]
    assert stats.loss_tokens == 4 + 2 + 6 + 4  # every answer token is a target (the prompts are not)


def test_no_packing_pads_one_example_per_row():
    examples = [_example(3, 4, 100), _example(5, 2, 200)]
    rows, stats = build_rows(examples, seq_len=10, packing=False, overlong="truncate", pad_id=3, seed=0)
    assert len(rows) == 2 and stats.padding == 20 - 6 - 6
    for row in rows:
        n = 6
        assert (row[0, n:] == 3).all() and (row[1, n:] == IGNORE_INDEX).all()


def test_overlong_examples_truncated_or_dropped_and_counted():
    examples = [_example(2, 3, 100), _example(2, 20, 200), _example(12, 8, 300)]
    rows, stats = build_rows(examples, seq_len=8, packing=True, overlong="truncate", pad_id=3, seed=0)
    # 200: cut to 9 tokens, keeps answer tokens; 300: its answer starts after token 9, so nothing is left to learn.
    assert (stats.truncated, stats.dropped) == (2, 1)
    assert 300 not in rows[:, 0].flatten().tolist() and 200 in rows[:, 0].flatten().tolist()
    rows, stats = build_rows(examples, seq_len=8, packing=True, overlong="drop", pad_id=3, seed=0)
    assert (stats.truncated, stats.dropped) == (0, 2)
    assert set(rows[:, 0].flatten().tolist()) - {3} <= set(range(100, 105))
    with pytest.raises(DataError, match="No instruction example fits"):
        build_rows(examples[1:], seq_len=8, packing=True, overlong="drop", pad_id=3, seed=0)
    assert "WARNING: 2 of 3 examples lost answer tokens or were dropped" in stats.summary("train", 8, True)
    _, stats = build_rows(
        examples + [_example(2, 3, 100)] * 7, seq_len=8, packing=True, overlong="drop", pad_id=3, seed=0
    )
    assert "WARNING" not in stats.summary("train", 8, True)  # 2 of 10: not more than a quarter


def test_loader_batches_resume_exactly_across_world_sizes(tokenizer, capsys):
    cfg = InstructConfig(paths=[SELF_INSTRUCT], packing=True, overlong="truncate", val_fraction=0.05)

    def make(rank, world, batch):
        return build_instruct_loader(cfg, tokenizer, "train", 64, batch, rank, world, seed=7)  # noqa: E731

    ranks = [make(0, 2, 3), make(1, 2, 3)]
    assert "ift train:" in capsys.readouterr().err  # counts reported (rank 0 only)
    single = make(0, 1, 6)
    n_rows = len(single.rows)
    for _ in range(3):
        parts = [next(loader) for loader in ranks]
        whole = next(single)
        assert set(whole) == {"input_ids", "labels", "position_ids", "doc_ids"}
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    resumed = make(0, 1, 6)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(resumed)["input_ids"], next(single)["input_ids"])
    # An epoch visits every row once, then the order is reshuffled.
    epoch = make(0, 1, 1)
    first = [next(epoch)["input_ids"][0] for _ in range(n_rows)]
    assert len({tuple(t.tolist()) for t in first}) == len({tuple(r[0].tolist()) for r in single.rows})
    second = [next(epoch)["input_ids"][0] for _ in range(n_rows)]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    other = build_instruct_loader(cfg, tokenizer, "train", 32, 6, 0, 1, seed=7)
    with pytest.raises(DataError, match="cannot resume exactly"):
        other.load_state_dict(single.state_dict())


def test_unpacked_loader_has_no_doc_ids_and_pads(tokenizer):
    cfg = InstructConfig(paths=[SELF_INSTRUCT], packing=False, overlong="drop", val_fraction=0.05)
    loader = build_instruct_loader(cfg, tokenizer, "val", 96, 2, 0, 1, seed=0)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (2, 96)
    pad = tokenizer.token_to_id(PAD)
    assert ((batch["input_ids"] == pad) <= (batch["labels"] == IGNORE_INDEX)).all()
    assert loader.stats.truncated == 0 and (batch["labels"] != IGNORE_INDEX).any()
    assert EOT not in tokenizer.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)


def test_packed_examples_cannot_attend_to_each_other(tokenizer):
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=128, init_std=0.1
        )
    ).eval()
    first = format_chat(
        [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"}], tokenizer
    )
    second = format_chat(TWO_TURNS, tokenizer)
    rows, _ = build_rows([first, second], seq_len=128, packing=True, overlong="truncate", pad_id=3, seed=0)
    assert len(rows) == 1
    input_ids, labels, positions, docs = rows[0:1].unbind(1)
    assert set(docs[0].tolist()) == {0, 1, 2}  # two examples and the padding

    def logits_of(tokens):
        with torch.no_grad():
            return model(tokens, position_ids=positions, doc_ids=docs)[0]

    base = logits_of(input_ids)
    perturbed_tokens = input_ids.clone()
    perturbed_tokens[docs == 0] = torch.randint(
        10, 4000, (int((docs == 0).sum()),), generator=torch.Generator().manual_seed(1)
    )
    perturbed = logits_of(perturbed_tokens)
    assert not torch.allclose(perturbed[docs == 0], base[docs == 0])
    torch.testing.assert_close(perturbed[docs == 1], base[docs == 1], rtol=0, atol=1e-5)
    with torch.no_grad():  # the check has teeth: without doc_ids, example 1 (after example 0) does see it
        unmasked = model(input_ids)[0], model(perturbed_tokens)[0]
    assert not torch.allclose(unmasked[0][docs == 1], unmasked[1][docs == 1])
    # ... and example 1 is computed exactly as if it were alone at the start of a sequence.
    alone_ids = input_ids[docs == 1][None]
    with torch.no_grad():
        alone = model(alone_ids)[0][0]
    torch.testing.assert_close(base[docs == 1], alone, rtol=0, atol=1e-5)
