"""Loading a checkpoint: into a DeepSpeed engine (resume), or as one fp32 state dict of its weights (init_from,
export, generate). Every pickle is scanned with weights_only=True first (train.checkpoint.safe_load)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from common.log import say
from train.checkpoint.layout import DS_MODEL_STATES, DS_MODEL_STATES_GLOB, DS_OPTIM_STATES_GLOB, rng_file
from train.checkpoint.rng_state import set_rng_state
from train.checkpoint.safe_load import safe_load, scan_pickles
from train.errors import TrainError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes DeepSpeed or torch.compile may put before our parameter names."""


def missing_deepspeed_files(step_dir: Path) -> str:
    """What DeepSpeed's bare AssertionError means: which of its files the folder lacks."""
    if not any(step_dir.glob(DS_MODEL_STATES_GLOB)):
        return f"{DS_MODEL_STATES} is missing from {step_dir} (the checkpoint is incomplete)"
    return f"one of DeepSpeed's files in {step_dir} is missing or unreadable (the checkpoint is incomplete)"


def load_checkpoint(
    engine: Any, step_dir: Path, rank: int, universal_dir: Optional[Path] = None
) -> Dict[str, Any]:
    """Load weights, optimizer and client state into `engine`, and this rank's RNG state; returns the client state.

    `universal_dir` is a DeepSpeed universal checkpoint converted from `step_dir` (world-size change).
    """
    source = universal_dir or step_dir
    scan_pickles(source)  # DeepSpeed unpickles with weights_only=False: refuse anything but plain types first
    try:
        load_path, client_state = engine.load_checkpoint(
            str(source.parent),
            tag=source.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    except (RuntimeError, KeyError, ValueError, AssertionError, OSError) as err:
        detail = " ".join(str(err).split())[:800] or missing_deepspeed_files(source)
        raise TrainError(
            f"DeepSpeed could not load checkpoint '{source}': {type(err).__name__}: {detail}"
        ) from None
    if load_path is None or client_state is None:
        raise TrainError(f"DeepSpeed found no checkpoint to load in '{source}'.")
    rng_path = rng_file(step_dir, rank)
    if rng_path.is_file() and universal_dir is None:
        set_rng_state(safe_load(rng_path), str(rng_path))
    return client_state


def strip_wrapper_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(name.startswith(prefix) for name in state_dict):
            state_dict = {name[len(prefix) :]: tensor for name, tensor in state_dict.items()}
    return state_dict


def consolidate_checkpoint(step_dir: Path) -> Dict[str, torch.Tensor]:
    """fp32 state dict of a DeepSpeed checkpoint folder (its parent is the checkpoint_dir, its name the tag).

    Any ZeRO stage and any number of ranks is consolidated with DeepSpeed's own zero_to_fp32 (exact fp32 master
    weights). A ZeRO-0 checkpoint has no partitioned optimizer state for it, so its module weights are read as
    saved (in the training precision).
    """
    from deepspeed.utils.zero_to_fp32 import (  # heavy: only when weights are consolidated
        get_fp32_state_dict_from_zero_checkpoint,
    )

    scan_pickles(
        step_dir
    )  # zero_to_fp32 unpickles with weights_only=False: refuse anything but plain types first
    state_dict = None
    if any(step_dir.glob(DS_OPTIM_STATES_GLOB)):  # ZeRO 1-3 partitions (bf16_zero_* too): exact fp32 masters
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress lines stay off stdout
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        except ValueError as err:
            if "not a zero checkpoint" not in str(err):
                raise TrainError(f"DeepSpeed could not consolidate checkpoint {step_dir}: {err}") from None
    if state_dict is None:  # ZeRO-0: rank 0 saved the whole module
        model_states = step_dir / DS_MODEL_STATES
        if not model_states.is_file():
            raise TrainError(
                f"{step_dir} holds neither ZeRO optimizer partitions nor {model_states.name}; "
                "expected a DeepSpeed checkpoint written by `slm train`."
            )
        say(
            f"note: {step_dir} has no ZeRO partitions; using its module weights as saved (training precision)."
        )
        state_dict = safe_load(model_states)["module"]
    return {
        name: tensor.float().contiguous() for name, tensor in strip_wrapper_prefixes(dict(state_dict)).items()
    }


def load_module_weights(step_dir: Path) -> Dict[str, torch.Tensor]:
    """The module state dict DeepSpeed saved in a step folder (its model-parallel rank 0 file), as saved."""
    return safe_load(step_dir / DS_MODEL_STATES)["module"]
