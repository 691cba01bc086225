"""Downstream task rows that do not fit their task (issue 21): a missing field, a wrong type, a gold label outside
the choices, more shots than the few-shot pool. Each is one TrainError naming the file and row, never scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.tokenizer import train_tokenizer
from train.downstream.data import TaskData
from train.downstream.evaluate import build_task_requests, example_requests
from train.downstream.tasks import get_task
from train.errors import TrainError

PIQA = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shake it", "label": 1}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["twist the lid of the jar and shake it open " * 20], vocab_size=280)


def write_split(root: Path, rows, split: str = "validation") -> str:
    folder = root / "piqa" / "none"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder / f"{split}.jsonl")


@pytest.mark.parametrize(
    "bad, needle",
    [
        (
            {**PIQA, "label": 2},
            r"row 2: its gold label is 2, outside its 2 choices; expected an index in \[0, 2\)",
        ),
        ({**PIQA, "label": -1}, r"row 2: its gold label is -1, outside its 2 choices"),
        (
            {k: v for k, v in PIQA.items() if k != "sol2"},
            r"row 2 does not fit the piqa schema \(no value in field",
        ),
        ({**PIQA, "label": "yes"}, r"row 2 does not fit the piqa schema \(ValueError"),
    ],
    ids=["label-too-big", "label-negative", "missing-field", "label-not-a-number"],
)
def test_bad_row_is_refused_naming_file_and_row(tmp_path, tokenizer, bad, needle):
    path = write_split(tmp_path, [PIQA, bad])
    with pytest.raises(TrainError, match=needle) as err:
        build_task_requests(["piqa"], tokenizer, data_dir=str(tmp_path))
    assert path in str(err.value) and "\n" not in str(err.value)


def test_more_shots_than_the_pool_is_refused(tmp_path, tokenizer):
    write_split(tmp_path, [PIQA, PIQA, PIQA])  # no train split: shots come from these, never a row's own
    assert len(build_task_requests(["piqa"], tokenizer, shots=2, data_dir=str(tmp_path))[0].requests) == 3
    with pytest.raises(
        TrainError, match=r"--shots / shots is 3 but piqa's few-shot examples .* number only 2"
    ):
        build_task_requests(["piqa"], tokenizer, shots=3, data_dir=str(tmp_path))
    train = write_split(tmp_path, [PIQA, {**PIQA, "label": 7}], split="train")  # a bad demonstration row
    with pytest.raises(
        TrainError, match=r"split 'train'\), row 2 does not fit .*gold label 7 is outside"
    ) as err:
        build_task_requests(["piqa"], tokenizer, shots=1, data_dir=str(tmp_path))
    assert train in str(err.value)


VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.text(max_size=6),
    st.lists(st.text(max_size=3), max_size=3),
)
TASK_ROWS = {
    "piqa": PIQA,
    "arc_easy": {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"},
    "hellaswag": {
        "activity_label": "Cooking",
        "ctx_a": "He takes a pan.",
        "ctx_b": "then",
        "endings": ["cooks.", "sleeps.", "runs.", "sits."],
        "label": "0",
    },
    "winogrande": {
        "sentence": "The cup fell off the _ table.",
        "option1": "a",
        "option2": "b",
        "answer": "2",
    },
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(sorted(TASK_ROWS)),
    edits=st.dictionaries(
        st.sampled_from(
            [
                "label",
                "sol1",
                "goal",
                "choices",
                "answerKey",
                "endings",
                "ctx_a",
                "sentence",
                "answer",
                "option1",
                "question",
            ]
        ),
        VALUE,
        max_size=3,
    ),
    dropped=st.sets(
        st.sampled_from(["label", "sol2", "choices", "endings", "answer", "sentence"]), max_size=2
    ),
)
def test_fuzzed_task_rows_give_requests_or_a_clear_error(name, edits, dropped):
    task = get_task(name)
    row = {k: v for k, v in {**TASK_ROWS[name], **edits}.items() if k not in dropped}
    try:
        request = example_requests(task, TaskData([row], "validation", "rows.jsonl"), 0)
    except TrainError as err:
        assert "rows.jsonl" in str(err) and "row 1" in str(err)
        return
    assert 0 <= request.gold < len(request.pairs)
    assert all(isinstance(c, str) and isinstance(t, str) for c, t in request.pairs)
