"""Weights to start from (`train.init_from`, `slm export`, `slm generate`): a run dir, a checkpoint or an export.

CPT and IFT take only the weights (fresh optimizer, step 0). What continued pretraining needs beyond that is
configuration, not code: re-warming and re-decaying the learning rate, as studied by Gupta et al., "Continual
Pre-Training of Large Language Models: How to (re)warm your model?" (arXiv 2308.04014), is the CPT run's own
schedule.warmup_steps / optim.lr / schedule.min_lr / schedule.name (warm up again to a peak, then decay; or
schedule=wsd for a warmup-stable-decay continuation); replaying a fraction of the original pretraining data
is one more entry in data.sources with its weight.

A DeepSpeed checkpoint of any ZeRO stage and any number of ranks is consolidated by
`train.checkpoint.consolidate_checkpoint` (DeepSpeed's zero_to_fp32: exact fp32 master weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from common.files import file_sha256
from data_pipeline.storage.store import is_remote
from model import Transformer
from model.config import ModelConfig
from train.checkpoint import (
    CheckpointRecord,
    consolidate_checkpoint,
    find_checkpoint,
    has_record,
    read_record,
    tokenizer_file,
    verify_checkpoint,
)
from train.errors import TrainError
from train.handoff.hf_format import load_hf_folder
from train.handoff.remote_export import fetch_weights
from train.handoff.shapes import check_state_dict


@dataclass
class WeightsSource:
    """Where weights come from: a checkpoint step folder (with its record) or a Hugging Face export folder."""

    kind: str
    """"checkpoint" or "export"."""
    path: Path
    """The step folder or the export folder."""
    tokenizer_path: Path
    """The tokenizer.json that belongs to these weights."""
    record: Optional[CheckpointRecord] = None
    """The checkpoint's record, its meta.json (None for an export)."""


def is_hf_export(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not has_record(path)


def locate_weights(path: str | os.PathLike) -> WeightsSource:
    """Resolve a run dir, checkpoints dir, step folder or export folder, or a URL of a checkpoint folder, a step
    folder or an export (copied into the node-local cache first); TrainError if none of these."""
    if is_remote(str(path)):
        path = fetch_weights(str(path))
    path = Path(path)
    if not path.exists():
        raise TrainError(
            f"Model source {path} does not exist; expected a run dir, a checkpoint folder or a Hugging Face export."
        )
    if is_hf_export(path):
        return WeightsSource("export", path, path / "tokenizer.json")
    step_dir = find_checkpoint(path)
    if step_dir is None:
        raise TrainError(
            f"{path} holds no complete checkpoint (no checkpoints/step_*/COMPLETE) and is not a Hugging Face export "
            "(no config.json); expected a run dir, a checkpoint folder or an `slm export` folder."
        )
    return WeightsSource("checkpoint", Path(step_dir), tokenizer_file(step_dir), read_record(step_dir))


def load_weights(source: WeightsSource) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Our-named state dict (complete, as Transformer.load_state_dict wants) and the ModelConfig of a source."""
    if source.kind == "export":
        return load_hf_folder(source.path)
    record = source.record
    assert record is not None, "a checkpoint source carries its record"
    try:
        cfg = record.run_config().model  # the run's model: its config with its plan's vocab_size
    except Exception as err:  # a meta.json from another version or hand-edited
        raise TrainError(f"{record.meta_path} has no usable 'config' ({err}).") from None
    verify_checkpoint(source.path, record)  # every file's size and hash, and the tokenizer copy, first
    state_dict = consolidate_checkpoint(source.path)
    if cfg.tie_embeddings and "lm_head.weight" not in state_dict and "embed_tokens.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    check_state_dict(state_dict, cfg, str(source.path))
    return state_dict, cfg


def load_init_weights(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], ModelConfig, Optional[str]]:
    """(state dict in our names, its ModelConfig, sha256 of its tokenizer.json or None if it has none)."""
    source = locate_weights(path)
    state_dict, cfg = load_weights(source)
    if source.record is not None and source.record.tokenizer_sha256:
        sha = source.record.tokenizer_sha256
    else:
        sha = file_sha256(source.tokenizer_path) if source.tokenizer_path.is_file() else None
    return state_dict, cfg, sha


def build_model(
    state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """An eval-mode Transformer holding these weights."""
    model = Transformer(cfg)
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state_dict.items()})
    return model.to(dtype).eval()
