"""What a run derives from its config, kept apart from it: the batch arithmetic (global batch, tokens per step),
max_steps (from train.max_tokens when set), the world size and model.vocab_size (from the tokenizer).

The loaded config stays what the user wrote (resolved and validated); run.dir/config.yaml and a checkpoint's
meta.json "config" record it unchanged, and run.dir/plan.json and meta.json "plan" record the `RunPlan` beside it.
Code that needs the effective max_steps or vocab size reads the plan (`RunPlan.model` for the model's shape);
`saved_config` and `effective_config` read a saved config back with its plan applied, of any layout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from common.atomic import atomic_write_json
from model.config import ModelConfig
from train.config import Config, TrainConfig, check_warmup, from_dict, upgrade_config
from train.errors import TrainError

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class RunPlan:
    """The values a run derives from its config (recorded beside it, never written into it)."""

    micro_batch_size: int
    """Sequences per rank per forward pass (train.micro_batch_size)."""
    grad_accum_steps: int
    """Micro-batches per optimizer step (train.grad_accum_steps)."""
    world_size: int
    """Data-parallel ranks of this run."""
    seq_len: int
    """Tokens per sequence (model.max_seq_len)."""
    max_steps: int
    """Optimizer steps of the run: train.max_steps, or ceil(train.max_tokens / tokens_per_step)."""
    vocab_size: Optional[int] = None
    """The model's vocabulary: the tokenizer's size rounded up as the data pipeline does (None before the
    tokenizer is known; then model.vocab_size)."""

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def model(self, model: ModelConfig) -> ModelConfig:
        """The model config this run builds: `model` with the plan's vocab_size."""
        if self.vocab_size is None or self.vocab_size == model.vocab_size:
            return model
        return dataclasses.replace(model, vocab_size=self.vocab_size)

    def to_dict(self) -> Dict[str, Any]:
        """The record (plan.json, meta.json "plan"): the fields, and the derived batch and tokens per step."""
        return {
            **dataclasses.asdict(self),
            "global_batch_size": self.global_batch_size,
            "tokens_per_step": self.tokens_per_step,
        }


def plan_batches(
    train: TrainConfig, world_size: int, seq_len: int, vocab_size: Optional[int] = None
) -> RunPlan:
    """Check train.global_batch_size and turn train.max_tokens into max_steps."""
    global_batch = train.micro_batch_size * train.grad_accum_steps * world_size
    if train.global_batch_size is not None and train.global_batch_size != global_batch:
        raise TrainError(
            f"train.global_batch_size is {train.global_batch_size}, but micro_batch_size {train.micro_batch_size} x "
            f"grad_accum_steps {train.grad_accum_steps} x data-parallel world size {world_size} = {global_batch}. "
            "Change train.grad_accum_steps or train.micro_batch_size (or the number of processes) so that they "
            "multiply to the global batch, or remove train.global_batch_size."
        )
    max_steps = train.max_steps
    if train.max_tokens is not None:
        if train.max_tokens <= 0:
            raise TrainError(
                f"train.max_tokens is {train.max_tokens}; expected a positive token budget or null."
            )
        max_steps = math.ceil(train.max_tokens / (global_batch * seq_len))
    return RunPlan(train.micro_batch_size, train.grad_accum_steps, world_size, seq_len, max_steps, vocab_size)


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    """The plan of a run of `cfg` on `world_size` ranks (vocab_size from the config until the tokenizer settles
    it), and the one check the config could not make itself: the warmup against a max_steps from train.max_tokens."""
    plan = plan_batches(cfg.train, world_size, cfg.model.max_seq_len, cfg.model.vocab_size)
    if cfg.train.max_tokens is not None:
        try:
            check_warmup(
                cfg.schedule.warmup_steps,
                plan.max_steps,
                f"the max_steps that train.max_tokens={cfg.train.max_tokens} gives",
            )
        except ValueError as err:
            raise TrainError(str(err)) from None
    return plan


def write_plan(run_dir: Path, plan: RunPlan) -> None:
    """run.dir/plan.json, beside config.yaml (atomically)."""
    atomic_write_json(Path(run_dir) / PLAN_FILE, plan.to_dict())


def effective_config(config: Dict[str, Any], plan: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A saved config dict (any layout) with its run's plan applied: model.vocab_size as the run built the model
    (configs saved before plans existed already held it)."""
    config = upgrade_config(config)
    if plan and plan.get("vocab_size") is not None:
        config.setdefault("model", {})["vocab_size"] = int(plan["vocab_size"])
    return config


def saved_config(config: Dict[str, Any], plan: Optional[Dict[str, Any]]) -> Config:
    """The Config a checkpoint's run used (its saved config with its plan applied), of any layout."""
    return from_dict(effective_config(config, plan))
