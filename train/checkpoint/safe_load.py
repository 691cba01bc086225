"""Loading checkpoint pickles without running code from them.

Our own files (the per-rank RNG states) hold only tensors and plain types and load with
`torch.load(weights_only=True)`. DeepSpeed's files (model states, optimizer partitions) are read by
DeepSpeed itself with `weights_only=False`; before that happens, `scan_pickles` opens every one of them
with `weights_only=True`, allowing only the few plain classes DeepSpeed writes (`DEEPSPEED_GLOBALS`). A
file that names any other global (a crafted `__reduce__`, say) is refused, naming the file; a file that
passes the scan can only build those classes, so DeepSpeed's full unpickler then does nothing more. The
scan memory-maps the file (`mmap=True`), so it reads the pickle, not the tensor data.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, List

import torch

from train.errors import TrainError

PLAIN_GLOBALS: List[Any] = [collections.OrderedDict, argparse.Namespace, torch.Size]
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)
"""The plain data classes DeepSpeed 0.19 pickles into checkpoint files (found with
torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, fp32/bf16/fp16 checkpoints)."""


def allowed_globals() -> List[Any]:
    found = list(PLAIN_GLOBALS)
    for dotted in DEEPSPEED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: its files then name a global we refuse, with a clear error
    return found


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load with weights_only=True and DeepSpeed's plain classes allowed; TrainError naming the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = " ".join(str(err).split())[:300]
        raise TrainError(
            f"Refusing to load {path}: it is not a plain tensor file ({reason}). A checkpoint file can run code "
            "when unpickled, so slm-forge loads only tensors and plain types; load only checkpoints you wrote."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise TrainError(
            f"Could not read checkpoint file {path}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from None


def pickle_files(folder: Path) -> Iterable[Path]:
    """Every .pt file DeepSpeed may open under `folder`. A link anywhere under it is refused: slm train writes
    none, DeepSpeed follows them, and a walk that does not would leave what they point to unscanned."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise TrainError(
                    f"Refusing to load checkpoint {folder}: {path.relative_to(folder)} is a symbolic link (to "
                    f"{os.readlink(path)}). slm train never writes links into a checkpoint, and DeepSpeed would "
                    "follow it to files no check has seen; replace it with the real files or remove it."
                )
        found += [Path(root) / name for name in files if name.endswith(".pt")]
    return sorted(found)


def scan_pickles(folder: str | os.PathLike) -> None:
    """Open every .pt file under `folder` safely (see the module docstring) before a third party loads them."""
    for path in pickle_files(Path(folder)):
        safe_load(path, mmap=True)
