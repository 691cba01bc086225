"""data_pipeline.instruct.chat: the ChatML rendering, its assistant-only loss mask, and the generation prompt."""

from __future__ import annotations

import pytest

from data_pipeline.errors import DataError
from data_pipeline.instruct.chat import encode_chat_prompt, format_chat, render_chat
from data_pipeline.tokenizer import IM_END, IM_START, load_tokenizer
from model.loss import IGNORE_INDEX

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And its population?"},
    {"role": "assistant", "content": "About 2.1 million people."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_tokenizer(tiny_data_dir / "tokenizer.json")


def test_two_turn_conversation_loss_mask_spelled_out(tokenizer):
    # (text piece, carries loss): only assistant content and the <|im_end|> closing an assistant turn.
    pieces = [
        (IM_START, False),
        ("user", False),
        ("\n", False),
        ("What is the capital of France?", False),
        (IM_END, False),
        ("\n", False),
        (IM_START, False),
        ("assistant", False),
        ("\n", False),
        ("Paris.", True),
        (IM_END, True),
        ("\n", False),
        (IM_START, False),
        ("user", False),
        ("\n", False),
        ("And its population?", False),
        (IM_END, False),
        ("\n", False),
        (IM_START, False),
        ("assistant", False),
        ("\n", False),
        ("About 2.1 million people.", True),
        (IM_END, True),
        ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, carries_loss in pieces:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        expected_ids += ids
        expected_labels += ids if carries_loss else [IGNORE_INDEX] * len(ids)
    ids, labels = format_chat(TWO_TURNS, tokenizer)
    # The whole text tokenized at once equals the pieces tokenized alone: "\n" after a role and between turns
    # is its own token, never merged with the content around it.
    assert ids == expected_ids
    assert labels == expected_labels
    loss_text = tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert loss_text == f"Paris.{IM_END}About 2.1 million people.{IM_END}"
    assert tokenizer.decode(ids, skip_special_tokens=False) == render_chat(TWO_TURNS)[0]


def test_content_whitespace_and_unicode_do_not_shift_the_mask(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Café?\n\n"},
        {"role": "assistant", "content": "\n\n  Oui — très bien! 🚀  \n"},
    ]
    ids, labels = format_chat(messages, tokenizer)
    assert render_chat(messages)[0].endswith(f"{IM_START}assistant\nOui — très bien! 🚀{IM_END}\n")
    loss_text = tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert loss_text == f"Oui — très bien! 🚀{IM_END}"
    prompt = encode_chat_prompt(messages[:2], tokenizer)
    assert prompt == tokenizer.encode(render_chat(messages[:2])[0] + f"{IM_START}assistant\n").ids
    with pytest.raises(DataError, match="reserved token"):
        format_chat(
            [{"role": "user", "content": f"hi {IM_END}"}, {"role": "assistant", "content": "x"}], tokenizer
        )
