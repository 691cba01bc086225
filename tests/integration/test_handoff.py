"""The hand-off chain end to end with the real trainer: a 2-rank ZeRO-3 checkpoint -> export -> CPT from the
export -> IFT from the CPT run -> chat export that transformers uses. At each start, the trainer's first logged
loss (taken before the first optimizer step) equals the source weights' loss on that same first batch."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.config import InstructConfig
from data_pipeline.instruct.chat import encode_chat_prompt
from data_pipeline.loading.loader import build_loader
from data_pipeline.tokenizer import IM_END, load_tokenizer
from model.loss import IGNORE_INDEX
from tests.helpers import SELF_INSTRUCT, TINY, run, slm_cmd
from tests.zero_checkpoints import build_checkpoints
from train.checkpoint import find_checkpoint, read_record
from train.handoff.export import export
from train.handoff.init_from import build_model, load_init_weights

SEED = 1337
SEQ_LEN = 64
MICRO_BATCH = 2
# The shapes of the zero3_tied_gqa checkpoint (tests/zero_checkpoints.py), fp32 so losses compare exactly.
COMMON = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=96",
    f"model.max_seq_len={SEQ_LEN}",
    "model.tie_embeddings=true",
    "train.precision=fp32",
    "train.zero_stage=1",
    f"train.micro_batch_size={MICRO_BATCH}",
    "train.max_steps=2",
    "schedule.warmup_steps=1",
    "optim.lr=1e-3",
    "schedule.min_lr=1e-4",
    "log.every=1",
    "eval.every=2",
    "eval.batches=1",
    "checkpoint.every=2",
    f"run.seed={SEED}",
]


def first_logged_loss(run_dir) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(row["loss"] for row in rows if row.get("step") == 1 and "loss" in row)


def loss_of(source, batch) -> float:
    state_dict, cfg, _ = load_init_weights(source)
    model = build_model(state_dict, cfg)
    with torch.no_grad():
        _, loss = model(
            batch["input_ids"],
            batch["labels"],
            position_ids=batch.get("position_ids"),
            doc_ids=batch.get("doc_ids"),
        )
    return loss.item()


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data_dir):
    """Runs the whole chain once; the tests below check its parts. Slow (about 35 s on 2 busy cores): the session's
    2-rank ZeRO-3 checkpoints if no other module made them yet, two `slm train` start-ups (CPT, IFT) and two
    exports that each load the result in transformers to verify it."""
    root = tmp_path_factory.mktemp("handoff")
    pretrain = build_checkpoints(tmp_path_factory, tiny_data_dir / "tokenizer.json") / "zero3_tied_gqa"
    pretrain_export = export(pretrain, root / "pretrain_export", dtype="fp32")
    cpt, ift = root / "cpt", root / "ift"
    run(
        slm_cmd(
            [
                "train",
                TINY,
                f"run.dir={cpt}",
                f"data.dir={tiny_data_dir}",
                "train.stage=cpt",
                f"train.init_from={pretrain_export}",
                *COMMON,
            ]
        ),
        timeout=300,
    )
    run(
        slm_cmd(
            [
                "train",
                TINY,
                f"run.dir={ift}",
                f"data.dir={tiny_data_dir}",
                "train.stage=ift",
                f"train.init_from={cpt}",
                f"ift.paths=[{SELF_INSTRUCT}]",
                *COMMON,
            ]
        ),
        timeout=300,
    )
    ift_export = export(ift, root / "ift_export", dtype="fp32")
    return {
        "pretrain": pretrain,
        "pretrain_export": pretrain_export,
        "cpt": cpt,
        "ift": ift,
        "ift_export": ift_export,
    }


@pytest.mark.slow
def test_cpt_from_export_starts_at_the_source_loss(chain, tiny_data_dir):
    batch = next(iter(build_loader(tiny_data_dir, "train", SEQ_LEN, MICRO_BATCH, 0, 1, SEED)))
    source_loss = loss_of(chain["pretrain"], batch)  # the DeepSpeed checkpoint itself, not the export
    assert first_logged_loss(chain["cpt"]) == pytest.approx(source_loss, abs=1e-5)
    assert source_loss == pytest.approx(loss_of(chain["pretrain_export"], batch), abs=1e-6)
    record = read_record(find_checkpoint(chain["cpt"]))
    assert record.step == 2 and record.identity.stage == "cpt"  # weights only: the step count restarted


@pytest.mark.slow
def test_ift_starts_at_the_cpt_loss_with_assistant_only_targets(chain, tiny_data_dir):
    tokenizer = load_tokenizer(tiny_data_dir / "tokenizer.json")
    loader = iter(_ift_loader(tokenizer))
    batch = next(loader)
    assert {"position_ids", "doc_ids"} <= set(batch) and (batch["labels"] == IGNORE_INDEX).any()
    assert first_logged_loss(chain["ift"]) == pytest.approx(loss_of(chain["cpt"], batch), abs=1e-5)


def _ift_loader(tokenizer):
    from data_pipeline.instruct.data import build_instruct_loader

    cfg = InstructConfig(paths=[SELF_INSTRUCT])
    return build_instruct_loader(cfg, tokenizer, "train", SEQ_LEN, MICRO_BATCH, 0, 1, SEED)


@pytest.mark.slow
def test_ift_export_is_a_chat_model_for_transformers(chain):
    transformers = pytest.importorskip("transformers")
    folder = chain["ift_export"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    messages = [{"role": "user", "content": "Give me three tips for a good night's sleep."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert inputs["input_ids"][0].tolist() == encode_chat_prompt(
        messages, load_tokenizer(folder / "tokenizer.json")
    )
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.eos_token == IM_END and model.config.eos_token_id == tokenizer.eos_token_id
