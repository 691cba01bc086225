"""Model-shape compatibility, checked in one place.

Two weights sources fit the same model when every key of `SHAPE_KEYS` agrees (the SwiGLU width as used, not
how it was asked for). Resuming also needs the same `max_seq_len` (the loader's windows and the RoPE tables
are sized by it); starting a cpt/ift run from weights (`train.init_from`) may change it, since no parameter
depends on it: that one documented difference is the `allow_seq_len_change` parameter. `init_std` only
affects a fresh init, so it may always change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch

from model.config import ModelConfig
from train.errors import TrainError

SHAPE_KEYS = (
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden_size",
    "vocab_size",
    "tie_embeddings",
    "rope_theta",
    "norm_eps",
)
"""What the weights' shapes and meaning depend on (ffn_hidden_size is the width actually used)."""
SEQ_LEN_KEY = "max_seq_len"

ModelLike = Union[ModelConfig, Mapping[str, Any]]


def as_model_config(model: ModelLike) -> ModelConfig:
    """A ModelConfig from itself or from its dict (as saved in a checkpoint's config); unknown keys are ignored."""
    if isinstance(model, ModelConfig):
        return model
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in model.items() if k in names})


def shape_differences(
    saved: ModelLike, wanted: ModelLike, allow_seq_len_change: bool = False
) -> List[Tuple[str, Any, Any]]:
    """(key, saved value, wanted value) for every shape key that differs; empty when the weights fit."""
    saved_cfg, wanted_cfg = as_model_config(saved), as_model_config(wanted)
    keys = SHAPE_KEYS if allow_seq_len_change else SHAPE_KEYS + (SEQ_LEN_KEY,)
    return [
        (key, getattr(saved_cfg, key), getattr(wanted_cfg, key))
        for key in keys
        if getattr(saved_cfg, key) != getattr(wanted_cfg, key)
    ]


def expected_shapes(cfg: ModelConfig) -> Dict[str, torch.Size]:
    """Every parameter of `Transformer(cfg)` (our names) and its shape, from a model on the meta device."""
    from model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tensor.shape for name, tensor in model.state_dict(keep_vars=True).items()}


def check_state_dict(state_dict: Dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """TrainError naming missing, unexpected or misshapen tensors, so a bad source never reaches load_state_dict."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(shapes))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(shapes[k])})"
        for k in shapes
        if k in state_dict and state_dict[k].shape != shapes[k]
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:6])}" if missing else "",
                f"unexpected {', '.join(unexpected[:6])}" if unexpected else "",
                f"wrong shape {', '.join(wrong[:6])}" if wrong else "",
            )
            if part
        )
        raise TrainError(f"The weights in {source} do not fit the model config it records: {details}.")
