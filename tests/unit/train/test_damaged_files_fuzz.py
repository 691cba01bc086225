"""Hand-edited or damaged files we read back (issue 21): meta.json, metrics.jsonl, the prepare state and
journal, an export's config.json and weights. Random edits give a result or the package's one-paragraph error
(TrainError / DataError), never a traceback; the CLI prints it as `error: ...`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.files import file_sha256
from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.format.names import JOURNAL, STATE, WORK_DIR
from data_pipeline.prepare.common import parse_prepare_state, prepare_fingerprint
from data_pipeline.prepare.dispatch import prepare
from data_pipeline.tokenizer import train_tokenizer
from launch.cli import main
from model.config import ModelConfig
from model.transformer import Transformer
from tests.helpers import SHAKESPEARE, TINY
from tests.unit.train.test_checkpoint_files import make_checkpoint
from train.checkpoint import META, read_record, verify_checkpoint
from train.errors import TrainError
from train.handoff.export import export_from_model
from train.handoff.hf_format import load_hf_folder
from train.metrics import rewind_metrics

EXAMPLES = int(os.environ.get("SLM_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
JSON = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=False), st.text(max_size=6)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def edited(record: dict, data) -> dict:
    """`record` with a few fields replaced by random JSON or removed (nested one level too)."""
    out = json.loads(json.dumps(record))
    for _ in range(data.draw(st.integers(1, 3))):
        node = out
        key = data.draw(st.sampled_from(sorted(node)))
        if isinstance(node[key], dict) and node[key] and data.draw(st.booleans()):
            node, key = node[key], data.draw(st.sampled_from(sorted(node[key])))
        if data.draw(st.booleans()):
            node[key] = data.draw(JSON)
        else:
            del node[key]
    return out


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


@FUZZ
@given(data=st.data())
def test_fuzzed_meta_json_is_read_or_refused(tmp_path_factory, data):
    step_dir = make_checkpoint(tmp_path_factory.mktemp("ckpt"), 4)
    meta = json.loads((step_dir / META).read_text())
    meta["config"] = {"model": {"n_layers": 2}, "train": {"precision": "fp32"}}
    (step_dir / META).write_text(json.dumps(edited(meta, data)))
    try:
        record = read_record(step_dir)
        verify_checkpoint(step_dir, record)
    except TrainError as err:
        assert str(step_dir) in str(err) and "\n" not in str(err)
        return
    assert isinstance(record.identity.model, dict) and isinstance(record.identity.train, dict)


def test_meta_json_with_wrong_types_is_named_by_the_cli(tmp_path, capsys):
    step_dir = make_checkpoint(tmp_path / "run" / "checkpoints", 4)
    meta = json.loads((step_dir / META).read_text())
    (step_dir / META).write_text(json.dumps({**meta, "step": "four"}))
    err = cli_error(capsys, ["export", str(step_dir), str(tmp_path / "out")])
    assert f"{step_dir / META}' is damaged or hand-edited: the field 'step' is string 'four'" in err
    (step_dir / META).write_text(json.dumps({**meta, "files": {"../../x": {"size": 1, "hash": "h"}}}))
    with pytest.raises(TrainError, match="'../../x' is damaged or hand-edited .*outside the step folder"):
        verify_checkpoint(step_dir, read_record(step_dir))


@FUZZ
@given(rows=st.lists(st.one_of(JSON, st.fixed_dictionaries({"step": JSON, "loss": JSON})), max_size=4))
def test_fuzzed_metrics_rows_are_kept_or_refused_never_dropped(tmp_path_factory, rows):
    run_dir = tmp_path_factory.mktemp("run")
    lines = [json.dumps({"step": 1, "loss": 2.0})] + [json.dumps(r) for r in rows] + [json.dumps({"step": 9})]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    try:
        rewind_metrics(run_dir, 5)
    except TrainError as err:
        assert "metrics.jsonl' line" in str(err) and "will not drop" in str(err)
        assert (run_dir / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"  # untouched
        return
    kept = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert kept == [line for line in lines if json.loads(line)["step"] <= 5]  # only later rows are rewound


STATE_EXAMPLE = {
    "format_version": 1,
    "prepared_from": {"sources": []},
    "tokenizer_sha256": "ab",
    "journal_bytes": 0,
    "sources_done": [],
    "source_index": 0,
    "source": {
        "documents": 3,
        "train_documents": 3,
        "val_documents": 0,
        "replaced_chars": 0,
        "val_rule": "interleave",
        "position": [0, 3],
        "partial": {"train": {"index": 0, "tokens": 5}, "val": {"index": 0, "tokens": 0}},
    },
}


@FUZZ
@given(data=st.data())
def test_fuzzed_prepare_state_is_read_or_refused(data):
    text = json.dumps(edited(STATE_EXAMPLE, data))
    if data.draw(st.booleans()):
        text = text[: data.draw(st.integers(0, len(text)))]  # an interrupted write from outside
    try:
        state = parse_prepare_state(text, "d/.prepare/state.json", "d")
    except DataError as err:
        assert "d/.prepare/state.json" in str(err) and "Delete d " in str(err)
        return
    assert isinstance(state["source"]["position"], list) and isinstance(state["journal_bytes"], int)


@pytest.mark.parametrize("damage", ["empty", "truncated", "journal"])
def test_damaged_prepare_state_is_named_on_restart(tmp_path, damage):
    data_dir = tmp_path / "data"
    cfg = DataConfig(dir=str(data_dir), sources=[SourceConfig(path=SHAKESPEARE)], num_proc=1)
    tokenizer_cfg = TokenizerConfig(vocab_size=300)
    (data_dir / WORK_DIR).mkdir(parents=True)
    train_tokenizer([Path(SHAKESPEARE).read_text()[:5000]], vocab_size=300).save(
        str(data_dir / "tokenizer.json")
    )
    good = json.dumps(
        {
            **STATE_EXAMPLE,
            "journal_bytes": 3,
            "prepared_from": prepare_fingerprint(cfg, tokenizer_cfg),
            "tokenizer_sha256": file_sha256(data_dir / "tokenizer.json"),
        }
    )
    (data_dir / WORK_DIR / STATE).write_text({"empty": "", "truncated": good[:40], "journal": good}[damage])
    (data_dir / WORK_DIR / JOURNAL).write_text("{x\n")
    needle = (
        "shards.jsonl:1: the shard journal" if damage == "journal" else r"state.json, is damaged \(not JSON"
    )
    with pytest.raises(DataError, match=needle):
        prepare(cfg, tokenizer_cfg)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A 1-layer model exported without the transformers check (the files are what is under test)."""
    folder = tmp_path_factory.mktemp("export")
    tokenizer = train_tokenizer([Path(SHAKESPEARE).read_text()[:5000]], vocab_size=300)
    tokenizer.save(str(folder / "tok.json"))
    cfg = ModelConfig(
        n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, vocab_size=320, max_seq_len=16
    )
    torch.manual_seed(0)
    return export_from_model(
        Transformer(cfg).state_dict(), cfg, folder / "tok.json", folder / "out", dtype="fp32", verify=False
    )


@FUZZ
@given(data=st.data())
def test_fuzzed_export_config_is_loaded_or_refused(tiny_export, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("copy")
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_export / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edited(config, data)))
    try:
        state_dict, cfg = load_hf_folder(folder)
    except TrainError as err:
        assert str(folder) in str(err)
        return
    assert cfg.n_layers == 1 and state_dict


def test_truncated_weights_and_wrong_config_types_are_named(tiny_export, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((tiny_export / name).read_bytes())
    weights = (tiny_export / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    err = cli_error(capsys, ["generate", str(folder), "--prompt", "a", "--max-new-tokens", "1"])
    assert f"{folder / 'model.safetensors'} could not be read as safetensors" in err and "truncated" in err
    (folder / "model.safetensors").write_bytes(weights)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "1"}))
    with pytest.raises(TrainError, match=r"the field 'num_hidden_layers' is string '1'; expected an integer"):
        load_hf_folder(folder)
    assert TINY  # the preset the CLI tests share
