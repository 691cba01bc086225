"""The on-disk layout of a checkpoint: every file and folder name, ours and DeepSpeed's, in one place.

Layout under `run.dir/checkpoints/`:
  step_00000100/   DeepSpeed's files for tag `step_00000100` (the folder's parent is DeepSpeed's
                   checkpoint_dir), `rng_rank00000.pt`... (one per rank), `meta.json`, a copy of
                   `tokenizer.json`, and the completion marker `COMPLETE`.
    universal/     a DeepSpeed universal checkpoint converted from it (on a world size or ZeRO stage change).
  latest           text file naming the newest complete tag, replaced atomically.

A save writes under the temporary tag `tmp.step_00000100`; only when every rank has finished does
rank 0 add meta.json, the tokenizer and COMPLETE, rename the folder to its final name and replace
`latest`. A kill at any moment therefore leaves either the new checkpoint or the previous one; a
folder without COMPLETE is never loaded. DeepSpeed's own `latest` file (written in place) is not
used. All ranks must see the same checkpoint folder (a shared filesystem on multi-node jobs), or
checkpoint.dir is a URL (train.checkpoint.remote: the same step folders on an object store).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from train.errors import TrainError

CHECKPOINTS = "checkpoints"
"""The folder of a run dir that holds its checkpoints."""
COMPLETE = "COMPLETE"
"""The completion marker, written last: a step folder without it does not exist as a checkpoint."""
META = "meta.json"
"""The checkpoint's record (train.checkpoint.record.CheckpointRecord)."""
LATEST = "latest"
"""Text file in the checkpoints folder naming the newest complete tag (for people and shell tools)."""
TOKENIZER = "tokenizer.json"
"""The copy of the run's tokenizer a checkpoint carries, so it exports on its own."""
TMP_PREFIX = "tmp."
"""A folder being written: `tmp.step_00000100`, `tmp.universal`."""
UNIVERSAL = "universal"
"""The sub-folder holding the DeepSpeed universal checkpoint converted from a step folder."""
UNIVERSAL_RECORD = "universal.json"
"""In the universal sub-folder: the size and hash of every file the conversion wrote, checked before reuse."""
STEP_RE = re.compile(r"^step_(\d{8,})$")

DS_MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's module file of model-parallel rank 0 (the whole module under ZeRO 0)."""
DS_MODEL_STATES_GLOB = "mp_rank_*_model_states.pt"
DS_OPTIM_STATES_GLOB = "*_optim_states.pt"
"""DeepSpeed's ZeRO 1-3 optimizer partitions (`zero_pp_rank_*`, `bf16_zero_pp_rank_*`)."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(step_dir: Path) -> int:
    match = STEP_RE.match(Path(step_dir).name)
    if not match:
        raise TrainError(
            f"'{step_dir}' is not a checkpoint step folder (expected a name like step_00000100)."
        )
    return int(match.group(1))


def is_step_name(name: str) -> bool:
    return STEP_RE.match(name) is not None


def is_complete(step_dir: Path) -> bool:
    return is_step_name(step_dir.name) and (step_dir / COMPLETE).is_file()


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoints_location(checkpoint_dir: Optional[str], run_dir: Path) -> str:
    """Where a run's checkpoints live: checkpoint.dir (a folder or URL), or run.dir/checkpoints when unset."""
    return str(checkpoint_dir).rstrip("/") if checkpoint_dir else str(checkpoints_dir(run_dir))


def rng_file(step_dir: Path, rank: int) -> Path:
    """A rank's RNG states (train.checkpoint.rng_state: tensors and plain types)."""
    return step_dir / f"rng_rank{rank:05d}.pt"


def tokenizer_file(step_dir: Path) -> Path:
    return Path(step_dir) / TOKENIZER


def has_record(path: Path) -> bool:
    """Whether `path` holds a checkpoint record (meta.json), complete or not."""
    return (path / META).is_file()


def looks_like_checkpoint(path: Path) -> bool:
    """A step folder, complete or not, of ours or of DeepSpeed's."""
    return (path / COMPLETE).is_file() or has_record(path) or any(path.glob(DS_MODEL_STATES_GLOB))
