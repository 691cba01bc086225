"""The DeepSpeed JSON, generated from the typed config so that one YAML describes the whole run.

The generated keys include the communication options (overlap_comm, bucket sizes from the model's layer size) and,
at ZeRO-1 in bf16, fp32 gradient accumulation. A `deepspeed:` block in the YAML is deep-merged over them and wins
(offload, other bucket sizes, comms_logger...). Keys that the typed config owns are refused there, because the
training loop reads the typed values (batch arithmetic, LR, precision) and a second source of truth would silently
disagree with it.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Dict, Mapping, Optional, Set

from model.config import ModelConfig
from model.stats import param_counts
from train.config import TrainConfig
from train.errors import TrainError
from train.optim import deepspeed_optimizer_block
from train.optim_config import OptimConfig

# passthrough key -> the typed key that owns it
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size (micro_batch_size x grad_accum_steps x world size)",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "optim.name / lr / muon_lr / beta1 / beta2 / weight_decay (the trainer chooses the optimizer)",
    "scheduler": "schedule.name (the trainer sets the LR every step from train.schedule.lr_at)",
}


def _deep_merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_passthrough(extra: Mapping[str, Any]) -> None:
    for owned, typed in OWNED_KEYS.items():
        node: Any = extra
        for part in owned.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            raise TrainError(
                f"The deepspeed: block of the config sets '{owned}', which the typed config owns; "
                f"set {typed} instead and remove '{owned}' from the deepspeed: block."
            )


BUCKET_FLOOR = 2**22
"""Fewest elements in a communication bucket (8 MiB of bf16): smaller collectives are latency-bound on NVLink/IB."""


def bucket_elements(model: ModelConfig) -> int:
    """One transformer layer's parameters (at least BUCKET_FLOOR), a multiple of 8 for DeepSpeed's alignment."""
    layer = (param_counts(model)["non_embedding"] - model.d_model) // model.n_layers  # less the final norm
    return -(-max(layer, BUCKET_FLOOR) // 8) * 8


def communication_options(zero_stage: int, model: Optional[ModelConfig], device_type: str) -> Dict[str, Any]:
    """The zero_optimization keys that decide how ZeRO communicates, set on purpose instead of DeepSpeed's
    defaults (whose 5e8-element buckets are larger than the 125m-1b models: one bucket, reduced after the whole
    backward pass, and 1 GB buffers). Without `model`, the bucket sizes stay DeepSpeed's."""
    options: Dict[str, Any] = {}
    if zero_stage in (2, 3):
        # Reduce each full bucket on a side stream while the backward pass goes on; needs CUDA streams (on
        # CPU/gloo there is nothing to overlap with, only extra copies).
        options["overlap_comm"] = device_type == "cuda"
        # Copy gradients into one flat buffer as they are produced: no fragmentation, one buffer to reduce.
        options["contiguous_gradients"] = True
    if model is None or zero_stage == 0:
        return options
    bucket = bucket_elements(model)
    # ZeRO 2/3 reduce a bucket as soon as it is full: one layer's gradients, so reduction starts while lower layers
    # are still in backward, and overlap_comm's two buffers are a few MB instead of 2 x 1 GB. (ZeRO-1 in bf16
    # all-reduces its fp32 gradients once per step without it; ZeRO-1 in fp32/fp16 reduces in such buckets.)
    options["reduce_bucket_size"] = bucket
    if zero_stage in (1, 2):
        # The weight all-gather after the step uses it only where the backend lacks all_gather_into_tensor
        # (NCCL has it); sized like the reduce bucket so that fallback needs no 1 GB buffer either.
        options["allgather_bucket_size"] = bucket
    if zero_stage == 3:
        # Gather the next layer's weights while this one computes: one layer ahead, no more.
        options["stage3_prefetch_bucket_size"] = bucket
        # Vectors up to 10 x d_model (the norms) stay whole on every rank, gathering them each forward costs
        # more in latency than they weigh; every matrix (at least d_model x head_dim) is partitioned.
        options["stage3_param_persistence_threshold"] = 10 * model.d_model
    return options


def plain_optimizer(train: TrainConfig) -> bool:
    """ZeRO 0 in fp32: DeepSpeed calls our optimizer directly, with no gradient norm or non-finite skip of its own."""
    return train.zero_stage == 0 and train.precision == "fp32"


def build_deepspeed_config(
    train: TrainConfig,
    optim: OptimConfig,
    world_size: int,
    extra: Mapping[str, Any] | None = None,
    *,
    model: Optional[ModelConfig] = None,
    device_type: str = "cpu",
    skips_steps: bool = True,
) -> Dict[str, Any]:
    """The DeepSpeed config dict for this run (`extra` is the YAML's `deepspeed:` passthrough, which wins over
    every generated key it does not refuse; `model` and `device_type` size and switch the communication
    options; `skips_steps` is Config.skips_steps)."""
    generated: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        # ZeRO 0 in fp32 hands the step to our optimizer as it is (train.components.LoopRun.plain_optimizer): the
        # loop clips there with torch's fused clip_grad_norm_, since DeepSpeed's per-parameter clip fails on a step
        # whose gradients the non-finite skip dropped and costs a one-rank all-reduce besides.
        "gradient_clipping": 0.0 if plain_optimizer(train) else float(optim.grad_clip),
        "zero_optimization": {
            "stage": train.zero_stage,
            **communication_options(train.zero_stage, model, device_type),
        },
        # We pass our own torch AdamW (param groups without decay on norms/embeddings).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": train.precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling.
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our MetricsLogger reports progress; silence DeepSpeed's own periodic prints.
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if train.zero_stage == 1 and train.precision == "bf16":
        # ZeRO-1 + bf16 with fp32 accumulation is DeepSpeed's BF16_Optimizer: micro-batch gradients add up in
        # fp32 (bf16 sums lose the small ones), reduced once per step (ZeRO-2 reduce-scatters every micro-batch).
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    if train.precision == "bf16" and not skips_steps:
        # ZeRO 1-2 in bf16 look for a NaN/inf in every gradient before each step (a scan of all gradients, 3% of a
        # tiny-preset step) to skip it. Only a skipping run hands it such a step: otherwise the loop stops before
        # the optimizer step on any non-finite gradient it saw (train.loop.NonfiniteWatch).
        generated["bf16"]["check_grad_overflow"] = False
    if world_size == 1 and device_type == "cpu" and train.zero_stage in (1, 2):
        # One CPU rank has nothing to reduce: contiguous_gradients only adds a copy of every gradient into a bucket
        # on each backward (4% of a tiny-preset step, bench/train_step_profile.py); the values are the same. (On
        # a GPU it stays: there the flat buffer spares the allocator and the copy is cheap.)
        generated["zero_optimization"]["contiguous_gradients"] = False
    optimizer = deepspeed_optimizer_block(optim, device_type)
    if (
        optimizer is not None
    ):  # Muon: DeepSpeed builds it (AdamW is passed to deepspeed.initialize as an object)
        generated["optimizer"] = optimizer
        if (
            train.zero_stage == 3
        ):  # ZeRO-3 orthogonalizes gathered gradients, which it cannot do reduce-scattered
            generated["zero_optimization"]["reduce_scatter"] = False
    if extra:
        _check_passthrough(extra)
        generated = _deep_merge(generated, extra)
    if (
        optimizer is not None
        and train.zero_stage == 3
        and generated["zero_optimization"].get("reduce_scatter")
    ):
        raise TrainError(
            "The deepspeed: block sets zero_optimization.reduce_scatter: true, but optim.name=muon "
            "at ZeRO 3 needs it false (DeepSpeed's Muon orthogonalizes whole gathered gradients). Remove "
            "reduce_scatter from the deepspeed: block, or use optim.name=adamw."
        )
    return generated


class _ReadRecorder(dict):
    """A config dict that records which top-level keys are looked up (DeepSpeed probes with get, [], `in`
    and `in d.keys()`), so that keys DeepSpeed never reads can be named instead of silently ignored."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__(values)
        self.read: set = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def keys(self) -> Any:  # `key in d.keys()` must be recorded too
        recorder = self

        class _Keys(list):
            def __contains__(self, key: Any) -> bool:
                return recorder.__contains__(key)

        return _Keys(super().keys())


def keys_read(ds_config: Mapping[str, Any]) -> Set[str]:
    """Every top-level key DeepSpeedConfig looks up while it parses `ds_config` (it ignores all others)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    recorder = _ReadRecorder(copy.deepcopy(dict(ds_config)))
    DeepSpeedConfig(recorder)
    return {key for key in recorder.read if isinstance(key, str)}


def validate_deepspeed_config(ds_config: Dict[str, Any], passthrough: Mapping[str, Any] | None) -> None:
    """Run DeepSpeed's own validation now (needs torch.distributed) and turn its complaint into a TrainError;
    a top-level key of the deepspeed: block that DeepSpeed does not read (a typo, a removed option) is refused,
    since DeepSpeed itself would ignore it without a word."""
    from deepspeed.runtime.config import DeepSpeedConfigError

    try:
        read = keys_read(ds_config)
    except (DeepSpeedConfigError, ValueError, AssertionError, KeyError, TypeError) as err:
        detail = " ".join(str(err).split())
        if "errors.pydantic.dev" in detail:
            detail = detail.split(" For further information")[0]
        source = f" (including the config's deepspeed: block {dict(passthrough)})" if passthrough else ""
        raise TrainError(
            f"DeepSpeed rejected the generated DeepSpeed config{source}: {type(err).__name__}: {detail}. "
            "Fix the named key in the deepspeed: block (see https://www.deepspeed.ai/docs/config-json/)."
        ) from None
    unknown = sorted(str(key) for key in (passthrough or {}) if key not in read)
    if unknown:
        import deepspeed

        hint = difflib.get_close_matches(unknown[0], sorted(read), n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise TrainError(
            f"The deepspeed: block of the config has the top-level key '{unknown[0]}', which DeepSpeed "
            f"{deepspeed.__version__} does not read here (it would be ignored without a word).{suggestion} "
            "Remove it, or spell it as https://www.deepspeed.ai/docs/config-json/ does."
        )
