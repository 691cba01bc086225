"""README.md of an export: the model card the Hugging Face Hub shows, written from what the run recorded.

Facts come from the checkpoint's record (train.checkpoint.CheckpointRecord: config, step, tokens seen), the run's metrics.jsonl (the last eval
row; rows of kind "downstream" for benchmark scores) and the data manifest (sources, documents, tokens). A fact
that is not available is left out, never guessed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from data_pipeline.tokenizer import EOT, IM_END
from model.config import ModelConfig
from train.checkpoint import CheckpointRecord
from train.metrics import METRICS_FILE

NOT_METRICS = {"step", "time", "kind", "task", "name", "tokens"}
"""Keys of a metrics row that describe it rather than score it."""


@dataclass
class CardFacts:
    """What the model card says beyond the architecture; all optional."""

    stage: str = "pretrain"
    """pretrain, cpt or ift (from the checkpoint's config)."""
    step: Optional[int] = None
    """Optimizer steps of the exported checkpoint."""
    tokens_seen: Optional[int] = None
    """Tokens trained on in this run."""
    source: str = ""
    """The checkpoint or export the weights came from."""
    config: Dict[str, Any] = field(default_factory=dict)
    """The run's resolved config (the checkpoint record's config, in the current layout: train.config.upgrade_config)."""
    run_dir: Optional[Path] = None
    """The run folder holding metrics.jsonl."""


def facts_from_record(step_dir: Path, record: CheckpointRecord) -> CardFacts:
    """CardFacts of a checkpoint step folder (run_dir/checkpoints/step_N) and its record."""
    config = record.identity.effective_config  # the current layout, the model as the run built it
    return CardFacts(
        stage=record.identity.stage,
        step=record.step,
        tokens_seen=record.tokens_seen,
        source=str(step_dir),
        config=config,
        run_dir=step_dir.parent.parent,
    )


def read_metrics(run_dir: Optional[Path]) -> List[Dict[str, Any]]:
    """Rows of run_dir/metrics.jsonl that parse (a torn last line from a crash is skipped)."""
    path = run_dir / METRICS_FILE if run_dir else None
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_manifest(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    data_dir = config.get("data", {}).get("dir")
    path = Path(data_dir) / "manifest.json" if data_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def parameter_counts(state_dict: Dict[str, torch.Tensor]) -> tuple[int, int]:
    """(total, embedding) parameters, a tied head counted once."""
    seen, total = set(), 0
    for tensor in state_dict.values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel()
    return total, state_dict["embed_tokens.weight"].numel()


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def data_section(facts: CardFacts) -> List[str]:
    if facts.stage == "ift":
        paths = facts.config.get("ift", {}).get("paths") or []
        if not paths:
            return ["Not recorded."]
        return [
            "Instruction data (ChatML, loss on assistant tokens only): "
            + ", ".join(f"`{p}`" for p in paths)
            + "."
        ]
    manifest = read_manifest(facts.config)
    if manifest is None:
        sources = facts.config.get("data", {}).get("sources") or []
        return [f"- `{s.get('path')}` (weight {s.get('weight', 1)})" for s in sources] or ["Not recorded."]
    tokens: Dict[tuple, int] = {}
    for shard in manifest.get("shards", []):
        key = (shard.get("source"), shard.get("split"))
        tokens[key] = tokens.get(key, 0) + int(shard.get("tokens", 0))
    weights = {
        s.get("name") or Path(str(s.get("path"))).stem: s.get("weight", 1)
        for s in facts.config.get("data", {}).get("sources") or []
    }
    lines = ["| source | documents | train tokens | val tokens | weight |", "|---|---:|---:|---:|---:|"]
    for source in manifest.get("sources", []):
        name = source.get("name")
        lines.append(
            f"| {name} | {_number(source.get('documents', ''))} | {_number(tokens.get((name, 'train'), 0))} "
            f"| {_number(tokens.get((name, 'val'), 0))} | {weights.get(name, '')} |"
        )
    return lines


def evaluation_section(rows: List[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("val_loss") is not None]
    if evals:
        last = evals[-1]
        scores = ", ".join(
            f"{key} {_number(last[key])}" for key in ("val_loss", "val_ppl", "val_bpb") if key in last
        )
        lines.append(f"Held-out validation split at step {last.get('step')}: {scores}.")
        per_source = [
            f"{key.split('/')[1]} {_number(value)}"
            for key, value in last.items()
            if key.startswith("val/") and key.endswith("/loss") and value is not None
        ]
        if per_source:  # several data sources: each one's own validation split (train.evaluate.SOURCE_KEYS)
            lines.append(f"Validation loss per source: {', '.join(per_source)}.")
    centred = [r for r in rows if r.get("kind") == "downstream_score" and r.get("centred_score") is not None]
    if centred:
        last = centred[-1]
        lines += [
            "",
            f"Centred downstream score at step {last.get('step')}: {_number(last['centred_score'])} (each task's "
            f"accuracy rescaled so chance is 0 and perfect is 1, averaged over {last.get('tasks')}; not DCLM's "
            "CORE, see slm-forge's docs/evaluation.md).",
        ]
    downstream = [r for r in rows if r.get("kind") == "downstream"]
    if downstream:  # the latest evaluation's rows (eval.downstream logs one row per task every N steps)
        downstream = [r for r in downstream if r.get("step") == downstream[-1].get("step")]
        lines += ["", "| task | metric | value | step |", "|---|---|---:|---:|"]
        for row in downstream:
            task = row.get("task") or row.get("name") or ""
            for key, value in row.items():
                if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    lines.append(f"| {task} | {key} | {_number(value)} | {row.get('step', '')} |")
    return lines or ["No evaluation was recorded for this run."]


def model_card(
    cfg: ModelConfig,
    state_dict: Dict[str, torch.Tensor],
    dtype: str,
    chat: bool,
    facts: Optional[CardFacts] = None,
) -> str:
    """The README.md text (Hub YAML header + markdown)."""
    facts = facts or CardFacts(stage="ift" if chat else "pretrain")
    total, embedding = parameter_counts(state_dict)
    kind = "instruction-tuned chat" if chat else "base (pretrained)"
    stage_names = {
        "pretrain": "pretraining",
        "cpt": "continued pretraining",
        "ift": "instruction fine-tuning",
    }
    init_from = facts.config.get("train", {}).get("init_from")
    training = [
        f"- stage: {stage_names.get(facts.stage, facts.stage)}"
        + (f", initialized from `{init_from}`" if init_from else "")
    ]
    if facts.step is not None:
        training.append(f"- optimizer steps: {_number(facts.step)}")
    if facts.tokens_seen is not None:
        training.append(
            f"- tokens trained: {_number(facts.tokens_seen)}" + (" (this stage)" if init_from else "")
        )
    train_cfg = facts.config.get("train", {})
    if train_cfg:
        optim_cfg, schedule_cfg = facts.config.get("optim", {}), facts.config.get("schedule", {})
        training.append(
            f"- peak lr {optim_cfg.get('lr')}, schedule {schedule_cfg.get('name', 'cosine')}, "
            f"ZeRO stage {train_cfg.get('zero_stage')}, precision {train_cfg.get('precision')}"
        )
    use = (
        [
            "A chat model: prompt it with the ChatML template (`tokenizer.apply_chat_template(messages, "
            "add_generation_prompt=True)`); it ends its answer with `<|im_end|>`."
        ]
        if chat
        else [
            f"A base model: it continues plain text and ends a document with `{EOT}`. It was never trained on the "
            f"ChatML template it carries; the template is there so that SFT on chat data (our `train.stage=ift`, or "
            f"TRL's SFTTrainer) trains the same format. Its eos is `{EOT}`; generation_config.json stops at "
            f"`{EOT}` or `{IM_END}`, so a model fine-tuned from it stops at the end of an answer."
        ]
    )
    use.append(
        f"At {total / 1e6:.1f}M parameters it is meant for research, teaching and as a starting point for "
        "continued pretraining or fine-tuning, not for factual or safety-critical use."
    )
    use.insert(1, "")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- slm-forge",
        "- llama",
        "---",
        "",
        f"# {kind.capitalize()} Llama model ({total / 1e6:.1f}M parameters) made with slm-forge",
        "",
        "## Architecture",
        "",
        f"`LlamaForCausalLM`: {cfg.n_layers} layers, hidden size {cfg.d_model}, {cfg.n_heads} attention heads "
        f"({cfg.n_kv_heads} key/value heads, head dim {cfg.head_dim}), SwiGLU MLP {cfg.ffn_hidden_size}, RMSNorm, "
        f"RoPE (theta {cfg.rope_theta:g}), context {cfg.max_seq_len} tokens, vocabulary {cfg.vocab_size} "
        f"(byte-level BPE), {'tied' if cfg.tie_embeddings else 'untied'} embeddings; weights in "
        f"{'bfloat16' if dtype == 'bf16' else 'float32'}.",
        "",
        f"Parameters: {total:,} total, {total - embedding:,} non-embedding.",
        "",
        "## Training",
        "",
        *training,
        "",
        "### Data",
        "",
        *data_section(facts),
        "",
        "## Evaluation",
        "",
        *evaluation_section(read_metrics(facts.run_dir)),
        "",
        "## How it was made",
        "",
        f"Trained with slm-forge (DeepSpeed ZeRO) and exported from `{facts.source or 'model weights'}` by "
        "`slm export`, which checked that transformers gives the same logits and token ids as the training code.",
        "",
        "## Intended use",
        "",
        *use,
        "",
        "See slm-forge's docs/downstream.md for transformers, PEFT, TRL, lm-evaluation-harness and llama.cpp.",
        "",
    ]
    return "\n".join(lines)
