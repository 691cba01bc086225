"""Weights to start from (`train.init_from`, `slm export`, `slm generate`): a run dir, a checkpoint or an export.

CPT and IFT take only the weights (fresh optimizer, step 0). What continued pretraining needs beyond that is
configuration, not code: re-warming and re-decaying the learning rate, as studied by Gupta et al., "Continual
Pre-Training of Large Language Models: How to (re)warm your model?" (arXiv 2308.04014), is the CPT run's own
schedule.warmup_steps / optim.lr / schedule.min_lr / schedule.name (warm up again to a peak, then decay; or
schedule=wsd for a warmup-stable-decay continuation); replaying a fraction of the original pretraining data
is one more entry in data.sources with its weight.

A DeepSpeed checkpoint of any ZeRO stage and any number of ranks is consolidated with DeepSpeed's own
zero_to_fp32 (exact fp32 master weights). A ZeRO-0 checkpoint has no partitioned optimizer state for it, so its
module weights are read as saved (in the training precision).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from common.files import file_sha256
from model import Transformer
from model.config import ModelConfig
from train.errors import TrainError
from train.handoff.hf_format import load_hf_folder
from train.handoff.shapes import check_state_dict
from train.plan import saved_config

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes DeepSpeed or torch.compile may put before our parameter names."""


@dataclass
class WeightsSource:
    """Where weights come from: a checkpoint step folder (with its meta) or a Hugging Face export folder."""

    kind: str
    """"checkpoint" or "export"."""
    path: Path
    """The step folder or the export folder."""
    tokenizer_path: Path
    """The tokenizer.json that belongs to these weights."""
    meta: Optional[Dict[str, Any]] = None
    """The checkpoint's meta.json (None for an export)."""


def is_hf_export(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "meta.json").is_file()


def locate_weights(path: str | os.PathLike) -> WeightsSource:
    """Resolve a run dir, checkpoints dir, step folder or export folder; TrainError if none of these."""
    path = Path(path)
    if not path.exists():
        raise TrainError(
            f"Model source {path} does not exist; expected a run dir, a checkpoint folder or a Hugging Face export."
        )
    if is_hf_export(path):
        return WeightsSource("export", path, path / "tokenizer.json")
    from train.checkpoint import find_checkpoint, read_meta

    step_dir = find_checkpoint(path)
    if step_dir is None:
        raise TrainError(
            f"{path} holds no complete checkpoint (no checkpoints/step_*/COMPLETE) and is not a Hugging Face export "
            "(no config.json); expected a run dir, a checkpoint folder or an `slm export` folder."
        )
    return WeightsSource("checkpoint", Path(step_dir), Path(step_dir) / "tokenizer.json", read_meta(step_dir))


def strip_wrapper_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(name.startswith(prefix) for name in state_dict):
            state_dict = {name[len(prefix) :]: tensor for name, tensor in state_dict.items()}
    return state_dict


def consolidate_checkpoint(step_dir: Path) -> Dict[str, torch.Tensor]:
    """fp32 state dict of a DeepSpeed checkpoint folder (its parent is the checkpoint_dir, its name the tag)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from train.safe_load import safe_load, scan_pickles

    scan_pickles(
        step_dir
    )  # zero_to_fp32 unpickles with weights_only=False: refuse anything but plain types first
    state_dict = None
    if any(step_dir.glob("*_optim_states.pt")):  # ZeRO 1-3 partitions (bf16_zero_* too): exact fp32 masters
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress lines stay off stdout
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        except ValueError as err:
            if "not a zero checkpoint" not in str(err):
                raise TrainError(f"DeepSpeed could not consolidate checkpoint {step_dir}: {err}") from None
    if state_dict is None:  # ZeRO-0: rank 0 saved the whole module
        model_states = step_dir / "mp_rank_00_model_states.pt"
        if not model_states.is_file():
            raise TrainError(
                f"{step_dir} holds neither ZeRO optimizer partitions nor {model_states.name}; "
                "expected a DeepSpeed checkpoint written by `slm train`."
            )
        print(
            f"note: {step_dir} has no ZeRO partitions; using its module weights as saved (training precision).",
            file=sys.stderr,
        )
        state_dict = safe_load(model_states)["module"]
    return {
        name: tensor.float().contiguous() for name, tensor in strip_wrapper_prefixes(dict(state_dict)).items()
    }


def load_weights(source: WeightsSource) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Our-named state dict (complete, as Transformer.load_state_dict wants) and the ModelConfig of a source."""
    if source.kind == "export":
        return load_hf_folder(source.path)
    try:
        cfg = saved_config(source.meta).model  # the run's model: its config with its plan's vocab_size
    except Exception as err:  # a meta.json from another version or hand-edited
        raise TrainError(f"{source.path / 'meta.json'} has no usable 'config' ({err}).") from None
    from train.checkpoint_files import verify_checkpoint

    verify_checkpoint(source.path, source.meta)  # every file's size and hash, and the tokenizer copy, first
    state_dict = consolidate_checkpoint(source.path)
    if cfg.tie_embeddings and "lm_head.weight" not in state_dict and "embed_tokens.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    check_state_dict(state_dict, cfg, str(source.path))
    return state_dict, cfg


def load_init_weights(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], ModelConfig, Optional[str]]:
    """(state dict in our names, its ModelConfig, sha256 of its tokenizer.json or None if it has none)."""
    source = locate_weights(path)
    state_dict, cfg = load_weights(source)
    if source.meta is not None and source.meta.get("tokenizer_sha256"):
        sha = source.meta["tokenizer_sha256"]
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
