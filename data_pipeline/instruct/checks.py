"""Checks and labelling for instruction conversations: role order, empty answers, and which tokens carry loss.

Labelling is O(tokens x log(turns)): each token's character span is looked up among the sorted loss spans
with a binary search, so a long many-turn example costs no more than its tokenization.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Sequence, Tuple

from data_pipeline.errors import DataError
from model.loss import IGNORE_INDEX


def loss_labels(
    ids: Sequence[int], offsets: Sequence[Tuple[int, int]], loss_spans: Sequence[Tuple[int, int]]
) -> List[int]:
    """labels[i] = ids[i] where token i's characters overlap a loss span (sorted, disjoint), else -100."""
    ends = [end for _, end in loss_spans]
    labels = [IGNORE_INDEX] * len(ids)
    for i, (start, end) in enumerate(offsets):
        j = bisect.bisect_right(ends, start)  # the first span that ends after this token starts
        if j < len(loss_spans) and loss_spans[j][0] < end:
            labels[i] = ids[i]
    return labels


def check_role_order(conversation: Sequence[Dict[str, str]], where: str) -> None:
    """An optional system message first, then user and assistant turns alternating, starting with user."""
    expected = "user"
    for j, message in enumerate(conversation):
        role = message["role"]
        if role == "system":
            if j == 0:
                continue
            raise DataError(
                f"{where}: messages[{j}] is a system message after the conversation started; a system "
                "message may only come first."
            )
        if role != expected:
            after = (
                "at the start"
                if j == 0 or (j == 1 and conversation[0]["role"] == "system")
                else f"after a {conversation[j - 1]['role']} message"
            )
            raise DataError(
                f"{where}: messages[{j}] is an {role} message {after}; expected a {expected} message "
                "(turns go system?, user, assistant, user, assistant, ...)."
            )
        expected = "assistant" if role == "user" else "user"


def has_empty_answer(conversation: Sequence[Dict[str, str]]) -> bool:
    return any(m["role"] == "assistant" and not m["content"].strip() for m in conversation)


def check_some_answer(conversations: Sequence[Sequence[Dict[str, str]]], file: str) -> None:
    """A file in which every assistant answer is empty teaches only to stop: refuse it."""
    answers = [m for c in conversations for m in c if m["role"] == "assistant"]
    if answers and not any(m["content"].strip() for m in answers):
        raise DataError(
            f"Instruction data file '{file}': every one of its {len(answers)} assistant answers is empty; "
            "expected answers to learn from (check the field holding the output)."
        )
