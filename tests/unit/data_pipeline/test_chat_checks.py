"""Instruction data: labelling is exact and cheap on long many-turn examples, role order and empty answers are checked."""

from __future__ import annotations

import json

import pytest

from data_pipeline.config import InstructConfig
from data_pipeline.errors import DataError
from data_pipeline.instruct.chat import format_chat, render_chat
from data_pipeline.instruct.checks import IGNORE_INDEX, loss_labels
from data_pipeline.instruct.data import build_instruct_loader, read_conversations
from data_pipeline.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_tokenizer(tiny_data_dir / "tokenizer.json")


def naive_labels(ids, offsets, spans):
    """The definition: a token carries loss when its characters overlap any loss span."""
    return [
        t if any(s < e2 and e > s2 for s2, e2 in spans) else IGNORE_INDEX for t, (s, e) in zip(ids, offsets)
    ]


def many_turns(turns: int, words: int):
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i} " + "why " * words})
        messages.append({"role": "assistant", "content": f"answer {i} " + "because " * words})
    return messages


def test_labels_equal_the_overlap_definition(tokenizer):
    messages = many_turns(40, 7)
    text, spans = render_chat(messages)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids, labels = format_chat(messages, tokenizer)
    assert labels == naive_labels(encoding.ids, encoding.offsets, spans)
    assert 0 < sum(t != IGNORE_INDEX for t in labels) < len(labels)


def test_a_370_kb_example_with_thousands_of_turns_is_labelled(tokenizer):
    messages = many_turns(2500, 14)  # ~370 KB of text; the per-token scan over every span took ~1 min here
    text, _ = render_chat(messages)
    assert len(text) > 350_000
    ids, labels = format_chat(messages, tokenizer)
    assert len(ids) == len(labels) and labels.count(IGNORE_INDEX) < len(labels)


def test_loss_labels_handles_tokens_spanning_span_edges():
    spans = [(2, 4), (10, 12)]
    offsets = [(0, 2), (1, 3), (3, 5), (4, 10), (9, 11), (12, 20)]
    ids = [1, 2, 3, 4, 5, 6]
    assert (
        loss_labels(ids, offsets, spans) == naive_labels(ids, offsets, spans) == [-100, 2, 3, -100, 5, -100]
    )


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize(
    "messages, match",
    [
        (
            [{"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}],
            r"messages\[0\] is an assistant message at the start",
        ),
        (
            [
                {"role": "user", "content": "U"},
                {"role": "system", "content": "S"},
                {"role": "assistant", "content": "A"},
            ],
            r"messages\[1\] is a system message after the conversation started",
        ),
        (
            [
                {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"},
                {"role": "assistant", "content": "B"},
            ],
            r"messages\[2\] is an assistant message after a assistant message",
        ),
        (
            [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}],
            r"messages\[1\] is an assistant message at the start",
        ),
    ],
)
def test_roles_out_of_order_name_file_and_line(tmp_path, messages, match):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, {"messages": messages}])
    with pytest.raises(DataError, match=f"chat.jsonl:2: {match}"):
        read_conversations(str(path))


def test_a_file_of_empty_answers_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": f"q{i}", "output": "  "} for i in range(5)])
    with pytest.raises(DataError, match="empty.jsonl': every one of its 5 assistant answers is empty"):
        read_conversations(str(path))


def test_an_empty_answer_is_counted_in_the_summary(tmp_path, tokenizer, capsys):
    records = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(30)]
    records[3]["output"] = ""
    path = write_jsonl(tmp_path / "some.jsonl", records)
    cfg = InstructConfig(paths=[str(path)], val_fraction=0.0)
    loader = build_instruct_loader(cfg, tokenizer, "train", 64, 2, 0, 1, 0)
    assert loader.stats.empty_answers == 1
    assert "1 example(s) have an empty answer" in capsys.readouterr().err
