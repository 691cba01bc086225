"""The export's README.md: facts from the checkpoint meta, metrics.jsonl and the data manifest, nothing made up."""

from __future__ import annotations

import json

from model import ModelConfig, Transformer
from train.handoff.model_card import CardFacts, model_card, parameter_counts


def tiny_model():
    cfg = ModelConfig(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=4096, max_seq_len=128
    )
    return cfg, Transformer(cfg).state_dict()


def test_card_reports_run_facts_data_and_scores(tiny_data_dir, tmp_path):
    cfg, state_dict = tiny_model()
    rows = [
        {"kind": "train", "step": 10, "loss": 5.0},
        {"kind": "eval", "step": 10, "val_loss": 5.5, "val_ppl": 244.69, "val_bpb": 2.4},
        {"kind": "eval", "step": 20, "val_loss": 4.25, "val_ppl": 70.1, "val_bpb": 1.9123, "val/a/loss": 4.0},
        {"kind": "downstream", "step": 20, "task": "hellaswag", "acc": 0.2512, "acc_norm": 0.26},
        {"kind": "downstream_score", "step": 20, "centred_score": 0.0133, "tasks": "hellaswag"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    config = {
        "train": {"stage": "pretrain", "lr": 0.003, "zero_stage": 2, "precision": "bf16"},
        "data": {"dir": str(tiny_data_dir), "sources": [{"path": "data/tinyshakespeare.txt", "weight": 1.0}]},
    }
    card = model_card(
        cfg,
        state_dict,
        "bf16",
        chat=False,
        facts=CardFacts(
            stage="pretrain",
            step=20,
            tokens_seen=40960,
            source="runs/x/checkpoints/step_00000020",
            config=config,
            run_dir=tmp_path,
        ),
    )
    total, embedding = parameter_counts(state_dict)
    assert total == sum(p.numel() for p in Transformer(cfg).parameters())  # tied head counted once
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert f"Parameters: {total:,} total, {total - embedding:,} non-embedding." in card
    assert "2 layers, hidden size 64, 4 attention heads (2 key/value heads" in card and "bfloat16" in card
    assert "tokens trained: 40,960" in card and "optimizer steps: 20" in card
    manifest = json.loads((tiny_data_dir / "manifest.json").read_text())
    train_tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    assert f"| tinyshakespeare | {manifest['sources'][0]['documents']:,} | {train_tokens:,} |" in card
    assert "step 20: val_loss 4.2500, val_ppl 70.1000, val_bpb 1.9123." in card  # the last eval row
    assert "Validation loss per source: a 4.0000." in card
    assert "Centred downstream score at step 20: 0.0133" in card and "averaged over hellaswag" in card
    assert "| hellaswag | acc | 0.2512 | 20 |" in card and "| hellaswag | acc_norm | 0.2600 | 20 |" in card
    assert "base (pretrained)" in card.lower() and "never trained on the ChatML template" in card


def test_card_without_a_run_says_so_and_chat_models_say_how_to_prompt():
    cfg, state_dict = tiny_model()
    card = model_card(cfg, state_dict, "fp32", chat=True, facts=CardFacts(stage="ift", config={}))
    assert "No evaluation was recorded for this run." in card and "tokens trained" not in card
    assert "apply_chat_template" in card and "float32" in card
    assert "### Data\n\nNot recorded." in card
