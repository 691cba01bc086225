"""Typed configs of a training run (where it writes, how it optimizes, what it logs) and the root `Config`
that composes every component's section; `launch.config` loads it from YAML and validates it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from common.checks import check_choice, check_finite_fields, check_positive
from data_pipeline.config import DataConfig, InstructConfig, TokenizerConfig
from model.config import ModelConfig
from train.downstream.config import EvalConfig

STAGES = ("pretrain", "cpt", "ift")
ZERO_STAGES = (0, 1, 2, 3)
"""The DeepSpeed ZeRO stages slm train supports (stated once; the config check and summaries use it)."""
PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "wsd", "wsd_time", "linear", "constant")
DECAY_SHAPES = ("linear", "cosine", "sqrt")
ON_NONFINITE = ("stop", "skip")
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class RunConfig:
    dir: str = "runs/tiny"
    """Folder for everything the run writes: config, metrics.jsonl, checkpoints, logs."""
    seed: int = 1337
    """Seed for model init, data order and every RNG."""


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    """pretrain, cpt (continued pretraining from train.init_from) or ift (instruction fine-tuning)."""
    init_from: Optional[str] = None
    """Checkpoint, run dir or export whose weights start a cpt/ift run (fresh optimizer, step 0)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: str = "bf16"
    """bf16, fp16 (dynamic loss scaling) or fp32."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: Optional[int] = None
    """If set, must equal micro_batch_size * grad_accum_steps * data-parallel world size."""
    max_steps: int = 200
    """Optimizer steps to run (the schedule's length)."""
    max_tokens: Optional[int] = None
    """Token budget; if set, max_steps becomes ceil(max_tokens / tokens_per_step)."""
    max_time: Optional[float] = None
    """Wall-clock seconds; when spent, the run evaluates, checkpoints and stops cleanly."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    schedule: str = "cosine"
    """cosine (warmup then cosine), wsd (warmup-stable-decay), wsd_time (wsd fitted to train.max_time), linear, or
    constant."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to lr."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final decay (wsd_time: fraction of train.max_time)."""
    decay_time_margin: float = 0.9
    """wsd_time: the share of the time left at the decision that the decay is planned to fill (the rest absorbs
    steps that turn slower, so the clock does not stop the run before min_lr)."""
    decay_shape: str = "linear"
    """wsd: shape of the final decay: linear, cosine or sqrt."""
    optimizer: str = "adamw"
    """adamw, or muon: Muon for the attention/MLP matrices, AdamW (train.lr) for embeddings, norms and head."""
    muon_lr: float = 0.02
    """train.optimizer=muon: peak learning rate of the Muon matrices (the schedule scales it like train.lr)."""
    muon_momentum: float = 0.95
    """train.optimizer=muon: Muon's Nesterov momentum."""
    muon_ns_method: str = "standard"
    """train.optimizer=muon: Newton-Schulz iteration: standard (bf16 quintic, Keller Jordan's) or gram (DeepSpeed's
    fp16 Gram form)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (matrices only; never norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_every: int = 50
    """Evaluate every this many steps (and at the end)."""
    eval_batches: int = 8
    """Fixed validation micro-batches per evaluation, over all ranks (the same samples for any world size)."""
    log_every: int = 10
    """Print and record a metrics row every this many steps."""
    ckpt_every: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep."""
    resume: str = "auto"
    """auto (resume from the latest complete checkpoint in run.dir), false (refuse a non-empty run.dir), or a checkpoint path."""
    verify_checkpoint_hashes: bool = True
    """Check the hash of every checkpoint file before loading it (sizes are always checked); false for huge ones."""
    export_every: int = 0
    """Export a Hugging Face folder every this many steps; 0 disables."""
    export_dtype: str = "bf16"
    """Weights dtype of those exports: bf16 or fp32 (the trained values exactly)."""
    on_nonfinite: str = "stop"
    """Non-finite loss or gradient norm: stop (naming the step) or skip the step and count it."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    backend: str = "auto"
    """Distributed backend: auto (nccl on cuda, gloo on cpu), nccl or gloo."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s per device for MFU; null means the built-in table for known GPUs (none on CPU)."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        for key, allowed in (
            ("stage", STAGES),
            ("zero_stage", ZERO_STAGES),
            ("precision", PRECISIONS),
            ("schedule", SCHEDULES),
            ("decay_shape", DECAY_SHAPES),
            ("on_nonfinite", ON_NONFINITE),
            ("device", DEVICES),
            ("backend", BACKENDS),
            ("export_dtype", ("bf16", "fp32")),
            ("optimizer", OPTIMIZERS),
            ("muon_ns_method", ("standard", "gram")),
        ):
            check_choice(f"train.{key}", getattr(self, key), allowed)
        for key in (
            "micro_batch_size",
            "grad_accum_steps",
            "max_steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "ckpt_every",
            "keep_checkpoints",
        ):
            check_positive(f"train.{key}", getattr(self, key))
        check_finite_fields(self, "train")
        if self.optimizer == "muon":
            self.validate_muon()
        self.validate_schedule()

    def validate_muon(self) -> None:
        """What DeepSpeed 0.19.8's Muon cannot do correctly is refused rather than trained wrongly."""
        if self.zero_stage > 0 and self.grad_clip > 0:
            raise ValueError(
                f"config key 'train.grad_clip' is {self.grad_clip} with train.optimizer=muon at ZeRO {self.zero_stage}: "
                "there DeepSpeed clips Muon's orthogonalized update instead of the gradient, which divides every step "
                "by the update's norm (deepspeedai/DeepSpeed#8439; 28x on the tiny model). Set train.grad_clip=0 "
                "(Muon's updates are bounded by construction), or use ZeRO 0."
            )
        if self.zero_stage == 3 and self.grad_accum_steps > 1:
            raise ValueError(
                f"config key 'train.grad_accum_steps' is {self.grad_accum_steps} with train.optimizer=muon at ZeRO 3: "
                "there DeepSpeed orthogonalizes each micro-batch's gradient instead of the accumulated one "
                "(deepspeedai/DeepSpeed#8443). Use train.grad_accum_steps=1 (a larger micro-batch), or ZeRO 1-2."
            )
        if self.on_nonfinite == "skip" and self.zero_stage == 0 and self.precision == "fp32":
            raise ValueError(
                "config keys 'train.optimizer=muon' and 'train.on_nonfinite=skip' at ZeRO 0 in fp32: that "
                "optimizer steps its momentum even without gradients, so a step cannot be skipped there. "
                "Use train.precision=bf16, a ZeRO stage of 1-3, or train.on_nonfinite=stop."
            )

    def validate_schedule(self) -> None:
        """The learning-rate schedule consistent (the trainer checks it again once max_tokens sets max_steps)."""
        if not self.lr > 0:
            raise ValueError(f"config key 'train.lr' is {self.lr}; expected a positive learning rate.")
        if self.min_lr < 0:
            raise ValueError(f"config key 'train.min_lr' is {self.min_lr}; expected 0 or a positive number.")
        if not self.muon_lr > 0:
            raise ValueError(
                f"config key 'train.muon_lr' is {self.muon_lr}; expected a positive learning rate."
            )
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(
                f"config key 'train.muon_momentum' is {self.muon_momentum}; expected a number in [0, 1)."
            )
        if self.min_lr > self.lr:
            raise ValueError(
                f"config key 'train.min_lr' ({self.min_lr}) is above 'train.lr' ({self.lr}); expected min_lr <= lr."
            )
        if self.warmup_steps < 0:
            raise ValueError(
                f"config key 'train.warmup_steps' is {self.warmup_steps}; expected 0 or a positive integer."
            )
        if self.max_tokens is None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"config key 'train.warmup_steps' ({self.warmup_steps}) is not below 'train.max_steps' ({self.max_steps}): "
                "the run would end before the learning rate reaches its peak. Lower train.warmup_steps."
            )
        if self.max_time is not None and self.max_time < 0:
            raise ValueError(
                f"config key 'train.max_time' is {self.max_time}; expected seconds >= 0 or null."
            )
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(
                f"config key 'train.peak_flops' is {self.peak_flops}; expected a positive number or null."
            )
        if not 0.0 < self.decay_time_margin <= 1.0:
            raise ValueError(
                f"config key 'train.decay_time_margin' is {self.decay_time_margin}; expected a number in (0, 1]."
            )
        if self.schedule == "wsd_time" and not (self.max_time and self.max_time > 0):
            raise ValueError(
                f"config key 'train.schedule' is wsd_time but train.max_time is {self.max_time}; expected "
                "the time budget in seconds (the decay starts at (1 - train.decay_fraction) * max_time)."
            )


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """disabled, offline or online."""
    project: str = "slm-forge"
    """wandb project name."""
    name: Optional[str] = None
    """Run name; defaults to the run.dir folder name."""
    tags: List[str] = field(default_factory=list)
    """Tags attached to the wandb run."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_choice("log.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LogConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""
    console: bool = True
    """Print metric rows on rank 0."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        self.wandb.validate()


@dataclass
class Config:
    """The whole run: one section per component (launch.config loads and validates it)."""

    run: RunConfig = field(default_factory=RunConfig)
    """Where the run writes and its seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Transformer shapes."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Byte-level BPE tokenizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Raw sources and prepared shards."""
    ift: InstructConfig = field(default_factory=InstructConfig)
    """Instruction data for train.stage=ift."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization, evaluation and checkpointing."""
    log: LogConfig = field(default_factory=LogConfig)
    """Console and wandb logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Downstream evaluation (eval.downstream)."""
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed JSON keys merged over the generated ones (DeepSpeed validates them)."""

    def validate(self) -> None:
        """Each section's own validate(); ValueError naming the first bad key."""
        for section in (self.train, self.log, self.data, self.ift, self.tokenizer, self.model, self.eval):
            section.validate()


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `slm config show` prints and run.dir/config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain dicts and lists (saved in checkpoints, given to wandb)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: Dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. the copy saved in a checkpoint)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
