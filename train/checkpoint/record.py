"""The one record of a checkpoint (its meta.json), typed: progress, the loader's position, the run's identity and
the file record. Nothing outside this package reads meta.json; everything asks a `CheckpointRecord`.

meta.json is one flat JSON object (tools read step, config, ... at the top level): the fields of `Progress`
and `RunIdentity`, `loader`, `saved_at`, and the file record (`files`, `files_hash`; train.checkpoint.files).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from common.json_fields import field_problem
from train.checkpoint.layout import META
from train.config import Config
from train.errors import TrainError
from train.plan import effective_config, saved_config
from train.schedule import TimedDecay

REQUIRED = (
    "step",
    "tokens_seen",
    "config",
    "tokenizer_sha256",
    "manifest_sha256",
    "world_size",
    "zero_stage",
)
"""The keys every meta.json written by slm train holds (loader, precision and the file record came later)."""
FILES_KEY = "files"
HASH_KEY = "files_hash"
FIELD_TYPES = {
    "step": int,
    "tokens_seen": int,
    "skipped_steps": int,
    "timed_decay": (dict, None),
    "config": dict,
    "tokenizer_sha256": str,
    "manifest_sha256": (str, None),
    "world_size": int,
    "zero_stage": int,
    "precision": (str, None),
    "plan": (dict, None),
    "loader": (dict, None),
    FILES_KEY: (dict, None),
    HASH_KEY: str,
}
"""The JSON type of every meta.json field slm train writes (a hand-edited record is refused naming the field)."""
MINIMUM = {"step": 0, "tokens_seen": 0, "skipped_steps": 0, "world_size": 1, "zero_stage": 0}


@dataclass
class Progress:
    """How far a run is: what the loop counts and a checkpoint restores."""

    step: int = 0
    """Optimizer steps taken (skipped non-finite steps included)."""
    tokens_seen: int = 0
    """Training tokens consumed, over all ranks."""
    skipped_steps: int = 0
    """Steps whose update was skipped as non-finite (train.on_nonfinite=skip)."""
    timed_decay: Optional[TimedDecay] = None
    """schedule.name=wsd_time: the decay decided from the clock (start step, length), once it has started."""
    guard: Optional[Dict[str, Any]] = None
    """The stability guard's state (train.guard): each signal's window and the rollbacks made; None when off."""


@dataclass
class RunIdentity:
    """What a checkpoint must match to continue a run: the config, the data and the layout it was written with."""

    config: Dict[str, Any]
    """The resolved config (train.config.to_dict)."""
    tokenizer_sha256: str
    """sha256 of data.dir/tokenizer.json."""
    manifest_sha256: Optional[str]
    """sha256 of data.dir/manifest.json (None for instruction data)."""
    world_size: int
    """Data-parallel ranks."""
    zero_stage: int
    """DeepSpeed ZeRO stage."""
    precision: Optional[str]
    """bf16, fp16 or fp32 (None only in a record that has neither it nor train.precision)."""
    plan: Optional[Dict[str, Any]] = None
    """What the run derived from its config (train.plan.RunPlan.to_dict; None in older checkpoints)."""

    @property
    def effective_config(self) -> Dict[str, Any]:
        """The config in the current layout (old one-section checkpoints upgraded) with the plan applied: the model
        as the run built it (train.plan.effective_config)."""
        return effective_config(self.config, self.plan)

    @property
    def model(self) -> Dict[str, Any]:
        """The `model` section as the run built it (its shape, the plan's vocab_size)."""
        return self.effective_config.get("model", {})

    @property
    def train(self) -> Dict[str, Any]:
        """The `train` section of the config."""
        return self.effective_config.get("train", {})

    @property
    def stage(self) -> str:
        """pretrain, cpt or ift."""
        return str(self.train.get("stage", "pretrain"))

    @property
    def optimizer(self) -> str:
        """adamw or muon (checkpoints from before the optimizer choice were AdamW)."""
        return self.effective_config.get("optim", {}).get("name", "adamw")

    def run_config(self) -> Config:
        """The typed Config the run used, its plan applied (train.plan.saved_config)."""
        return saved_config(self.config, self.plan)


@dataclass
class CheckpointRecord:
    """The one record of a checkpoint (its meta.json): progress, the loader's position and the run's identity.

    DeepSpeed's own files hold only weights, optimizer state and DeepSpeed's counters; nothing of ours is
    duplicated into its client state.
    """

    progress: Progress
    """Step, tokens seen, skipped steps."""
    loader: Optional[Dict[str, Any]]
    """The training loader's state_dict (its global cursor); None in a record written before it was kept."""
    identity: RunIdentity
    """Config, tokenizer/manifest sha256, world size, ZeRO stage, precision."""
    files: Optional[Any] = None
    """name (relative to the step folder) -> {"size", "hash"} of every file (None before the file record existed)."""
    files_hash: str = "sha256"
    """The algorithm of the file record's hashes."""
    step_dir: Optional[Path] = None
    """The step folder this record was read from (None for one being saved)."""

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def tokens_seen(self) -> int:
        return self.progress.tokens_seen

    @property
    def config(self) -> Dict[str, Any]:
        """The resolved config the checkpoint was written with (train.config.to_dict)."""
        return self.identity.config

    @property
    def world_size(self) -> int:
        return self.identity.world_size

    @property
    def zero_stage(self) -> int:
        return self.identity.zero_stage

    @property
    def precision(self) -> Optional[str]:
        return self.identity.precision

    @property
    def tokenizer_sha256(self) -> str:
        return self.identity.tokenizer_sha256

    @property
    def manifest_sha256(self) -> Optional[str]:
        return self.identity.manifest_sha256

    def run_config(self) -> Config:
        """The typed Config the run used, its plan applied (train.plan.saved_config)."""
        return self.identity.run_config()

    @property
    def meta_path(self) -> Path:
        return Path(self.step_dir or ".") / META

    def loader_state(self) -> Dict[str, Any]:
        """The loader's state for an exact resume; TrainError when the record has none."""
        if self.loader is None:
            raise TrainError(
                f"Checkpoint metadata '{self.meta_path}' has no loader state; it was written by another "
                "version of slm train and cannot be resumed exactly (start a fresh run.dir, or use its "
                "weights with train.stage=cpt and train.init_from)."
            )
        return self.loader

    def to_meta(self, files: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """meta.json: one flat JSON object (tools read step, config, ... at the top level).

        `files` is the folder's file record (train.checkpoint.files.record_files: `files`, `files_hash`), taken
        once every other file is written and before COMPLETE; loads verify the folder against it.
        """
        return {
            **asdict(self.progress),
            **asdict(self.identity),
            "loader": self.loader,
            "saved_at": time.time(),
            **(files or {}),
        }

    @classmethod
    def from_meta(cls, meta: Dict[str, Any], step_dir: Optional[Path] = None) -> CheckpointRecord:
        """The record of a parsed meta.json; TrainError when it lacks what slm train always writes."""
        where = Path(step_dir or ".") / META
        missing = [k for k in REQUIRED if k not in meta] if isinstance(meta, dict) else []
        if missing:
            raise TrainError(
                f"Checkpoint metadata '{where}' lacks {', '.join(missing)}; it was not written by this slm train."
            )
        problem = field_problem(meta, FIELD_TYPES, minimum=MINIMUM) or _decay_problem(meta.get("timed_decay"))
        if problem is None:  # every section of the saved config is a mapping (run, model, train, ...)
            problem = field_problem(meta["config"], dict.fromkeys(meta["config"], dict))
            problem = problem and f"config: {problem}"
        if problem:
            raise TrainError(
                f"Checkpoint metadata '{where}' is damaged or hand-edited: {problem}. Use another checkpoint "
                "(checkpoint.resume=auto falls back past a damaged one), or restore the file."
            )
        decay = meta.get("timed_decay")
        timed_decay = TimedDecay(int(decay["start_step"]), int(decay["steps"])) if decay else None
        progress = Progress(
            int(meta["step"]),
            int(meta["tokens_seen"]),
            int(meta.get("skipped_steps", 0)),
            timed_decay,
            meta.get("guard"),
        )
        config = meta["config"]
        saved_train = config.get("train") if isinstance(config, dict) else None
        saved_train = saved_train if isinstance(saved_train, dict) else None
        precision = meta.get("precision", (saved_train or {}).get("precision"))
        identity = RunIdentity(
            config,
            meta["tokenizer_sha256"],
            meta["manifest_sha256"],
            int(meta["world_size"]),
            int(meta["zero_stage"]),
            None if precision is None else str(precision),
            meta.get("plan"),
        )
        return cls(
            progress,
            meta.get("loader"),
            identity,
            files=meta.get(FILES_KEY),
            files_hash=str(meta.get(HASH_KEY, "sha256")),
            step_dir=None if step_dir is None else Path(step_dir),
        )


def _decay_problem(decay: Any) -> Optional[str]:
    if decay is None:
        return None
    inner = field_problem(decay, {"start_step": int, "steps": int}, required=("start_step", "steps"))
    return f"timed_decay: {inner}" if inner else None


def read_meta(step_dir: str | os.PathLike) -> Dict[str, Any]:
    """meta.json of a checkpoint as parsed JSON (this package's own use: read_record types it)."""
    meta_path = Path(step_dir) / META
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainError(
            f"Checkpoint '{step_dir}' has no {META}; expected a complete step folder written by slm train."
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"Checkpoint metadata '{meta_path}' could not be read: {err}.") from None


def read_record(step_dir: str | os.PathLike) -> CheckpointRecord:
    """The record of a checkpoint step folder (its meta.json, typed)."""
    return CheckpointRecord.from_meta(read_meta(step_dir), Path(step_dir))
