"""Every RNG's state as tensors and plain types, so a checkpoint's `rng_rank*.pt` loads with weights_only=True."""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

from train.errors import TrainError


def rng_state() -> Dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [int(version), torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [
            str(name),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any], where: str = "the RNG file") -> None:
    try:
        version, mt, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in mt.tolist()), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise TrainError(
            f"{where} does not hold the RNG states slm train saves ({type(err).__name__}: {err})."
        ) from None
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
