"""`slm train`: the DeepSpeed ZeRO training loop.

One optimizer step = `grad_accum_steps` micro-batches of forward + `engine.backward`, then one small
all-reduce of [loss, non-finite flag, stop signal, time up] across ranks, then `engine.step()`.
That all-reduce is the loop's only host synchronisation: it lets every rank agree, before the
optimizer step, on whether the step is non-finite (stop or skip it) and whether to stop after it
(SIGTERM/SIGUSR1 or train.max_time), and it hands rank 0 the step's mean loss for free. DeepSpeed's
own ZeRO step synchronises the host anyway (its overflow / grad-norm check), so this costs nothing
extra; the loss itself stays on the device until then.

The learning rate is a pure function of the step (`train.schedule.lr_at`), written into the
optimizer's param groups before each step; no DeepSpeed scheduler is used, so a resumed run needs
only its step. Everything the run writes lives under `run.dir`.

Fault-injection hook (tests only): SLM_INJECT_NAN_AT_STEP=K multiplies the loss of step K (1-based,
as logged) by NaN, to exercise train.on_nonfinite. See train.checkpoint for SLM_SLEEP_IN_SAVE.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.atomic import atomic_write_text
from train.checkpoint import (
    check_resumable,
    ensure_universal,
    find_checkpoint,
    load_checkpoint,
    load_mode,
    read_meta,
    save_checkpoint,
)
from train.config import Config, to_dict, to_yaml
from train.distributed import DistInfo, barrier, on_main_then_share, setup_distributed, teardown_distributed
from train.errors import TrainError
from train.evaluate import evaluate, model_inputs, take_batches
from train.metrics import METRICS_FILE, rewind_metrics
from train.preflight import BatchPlan, plan_batches, preflight
from train.signals import EXIT_PREEMPTED, StopRequest

INJECT_NAN_ENV = "SLM_INJECT_NAN_AT_STEP"
CLIENT_KEY = "slm_forge"
"""The key of our client state inside DeepSpeed's model-states file."""
RESUME_OFF = ("false", "no", "off", "0", "never")
RESUME_AUTO = ("auto", "true", "yes", "on", "1")


def say(dist_info: DistInfo, message: str) -> None:
    """A status line on rank 0's stdout."""
    if dist_info.is_main:
        print(f"[slm] {message}", flush=True)


# ---------------------------------------------------------------- resume and run dir


def resolve_resume(resume: str, run_dir: Path) -> Optional[Path]:
    """The step folder to resume from (None for a fresh start) according to train.resume."""
    value = str(resume).strip()
    if value.lower() in RESUME_AUTO:
        return find_checkpoint(run_dir)
    if value.lower() in RESUME_OFF:
        leftovers = [p.name for p in (run_dir / "checkpoints", run_dir / METRICS_FILE) if p.exists()]
        if leftovers:
            raise TrainError(
                f"train.resume is false but run.dir '{run_dir}' already holds {', '.join(leftovers)}; "
                "choose an empty run.dir, delete it, or set train.resume=auto to continue that run."
            )
        return None
    found = find_checkpoint(value)
    if found is None:
        raise TrainError(
            f"train.resume is '{value}', but no complete checkpoint is there; expected a run dir, its checkpoints "
            "folder or a step_XXXXXXXX folder containing COMPLETE (or train.resume=auto / false)."
        )
    return found


# ---------------------------------------------------------------- data


def ensure_prepared(cfg: Config, dist_info: DistInfo) -> Path:
    """data.dir with a manifest: prepared here by rank 0 (others wait) when it is missing."""
    data_dir = Path(cfg.data.dir)
    if not (data_dir / "manifest.json").is_file():
        def prepare_data() -> None:
            from data_pipeline.prepare import prepare

            print(f"[slm] {data_dir}/manifest.json not found: preparing the data now (rank 0; other ranks wait)",
                  flush=True)
            prepare(cfg.data, cfg.tokenizer)

        on_main_then_share(dist_info, prepare_data, "Preparing the data")
    barrier()
    return data_dir


def build_loaders(cfg: Config, data_dir: Path, tokenizer: Any, dist_info: DistInfo) -> tuple:
    """(train loader, fixed list of this rank's validation batches)."""
    seq_len, micro = cfg.model.max_seq_len, cfg.train.micro_batch_size
    # train.eval_batches counts micro-batches over all ranks: the loaders' global cursor then hands every
    # world size the same validation samples (exactly, when the world size divides eval_batches).
    val_batches_per_rank = math.ceil(cfg.train.eval_batches / dist_info.world_size)
    if cfg.train.stage == "ift":
        from data_pipeline.instruct import build_instruct_loader

        def instruct(split: str) -> Any:
            return build_instruct_loader(cfg.ift, tokenizer, split, seq_len, micro, dist_info.rank,
                                         dist_info.world_size, cfg.run.seed)

        return instruct("train"), take_batches(instruct("val"), val_batches_per_rank)
    from data_pipeline.documents import document_masked
    from data_pipeline.loader import build_loader
    from data_pipeline.sources import source_weights
    from data_pipeline.tokenizer import eot_id

    weights = source_weights(cfg.data) if len(cfg.data.sources) > 1 else None
    train_loader = build_loader(
        data_dir, "train", seq_len, micro, dist_info.rank, dist_info.world_size, cfg.run.seed,
        num_workers=cfg.data.num_workers, weights=weights, verify_checksums=cfg.data.verify_checksums,
    )
    val_loader = build_loader(data_dir, "val", seq_len, micro, dist_info.rank, dist_info.world_size, cfg.run.seed)
    if cfg.data.document_mask:  # attention within documents, positions restarting at each EOT
        return document_masked(train_loader, take_batches(val_loader, val_batches_per_rank), eot_id(tokenizer))
    return train_loader, take_batches(val_loader, val_batches_per_rank)


# ---------------------------------------------------------------- model


SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden_size", "vocab_size", "tie_embeddings",
              "rope_theta", "norm_eps")


def load_initial_weights(cfg: Config, tokenizer_sha256: str) -> Optional[Dict[str, torch.Tensor]]:
    """cpt/ift: the weights of train.init_from, checked against this run's tokenizer and model shape."""
    if cfg.train.stage == "pretrain":
        return None
    if not cfg.train.init_from:
        raise TrainError(f"train.stage is {cfg.train.stage} but train.init_from is not set; expected the run dir, "
                         "checkpoint or export whose weights this stage continues from.")
    from train.init_from import load_init_weights

    state_dict, init_cfg, init_sha = load_init_weights(cfg.train.init_from)
    if init_sha is not None and init_sha != tokenizer_sha256:
        raise TrainError(
            f"train.init_from '{cfg.train.init_from}' was trained with another tokenizer (sha256 {init_sha[:12]}...) "
            f"than {cfg.data.dir}/tokenizer.json ({tokenizer_sha256[:12]}...); the token ids would mean different "
            "things. Prepare the data with tokenizer.path set to the init source's tokenizer.json."
        )
    diffs = [f"model.{k} is {getattr(init_cfg, k)!r} there but {getattr(cfg.model, k)!r} here"
             for k in SHAPE_KEYS if getattr(init_cfg, k) != getattr(cfg.model, k)]
    if diffs:
        raise TrainError(f"train.init_from '{cfg.train.init_from}' has another model shape: " + "; ".join(diffs)
                         + ". Use the same model settings as the run it comes from.")
    return state_dict


class NonfiniteWatch:
    """Notices a NaN/inf gradient on this rank without a host sync: each parameter's incoming gradient
    adds its sum to a list (on the device); a non-finite element makes the total non-finite.

    Hooks see the local gradient before ZeRO reduces or partitions it, so the check is the same for
    every stage. Under fp16 overflowing scaled gradients are normal (DeepSpeed's loss scaler skips
    those steps), so only the loss is checked there.
    """

    def __init__(self, model: torch.nn.Module, enabled: bool) -> None:
        self.sums: List[torch.Tensor] = []
        self.handles = []
        if enabled:
            for param in model.parameters():
                if param.requires_grad:
                    self.handles.append(param.register_hook(self._record))

    def _record(self, grad: torch.Tensor) -> None:
        self.sums.append(grad.detach().sum(dtype=torch.float32))

    def nonfinite(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """1.0 when the loss or any gradient since the last call is non-finite, else 0.0 (device tensor)."""
        total = loss_sum.float()
        if self.sums:
            total = total + torch.stack(self.sums).sum()
        self.sums = []
        return (~torch.isfinite(total)).float()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Progress:
    """What the client state of a checkpoint carries besides the loader."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0


def run_training(cfg: Config) -> int:
    """Train according to `cfg`; 0 when finished (or train.max_time spent), EXIT_PREEMPTED after a stop signal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist_info = setup_distributed(cfg.train)
    try:
        return _train(cfg, dist_info)
    finally:
        teardown_distributed()


def _train(cfg: Config, dist_info: DistInfo) -> int:
    from data_pipeline.manifest import load_manifest, manifest_sha256
    from data_pipeline.tokenizer import file_sha256, load_tokenizer, model_vocab_size
    from train.schedule import check_schedule

    started = time.time()
    cfg = dataclasses.replace(cfg)  # the resolved copy this run records
    run_dir = Path(cfg.run.dir)
    if cfg.train.stage == "pretrain" and cfg.train.init_from:
        raise TrainError("train.init_from is set but train.stage is pretrain; use train.stage=cpt (or ift) to start "
                         "from those weights, or remove train.init_from.")
    plan = plan_batches(cfg.train, dist_info.world_size, cfg.model.max_seq_len)
    cfg.train = dataclasses.replace(cfg.train, max_steps=plan.max_steps)
    check_schedule(cfg.train)
    resume_from = resolve_resume(cfg.train.resume, run_dir)

    data_dir = ensure_prepared(cfg, dist_info)
    tokenizer_path = data_dir / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer_sha = file_sha256(tokenizer_path)
    manifest_sha = manifest_sha256(data_dir)
    bytes_per_token = load_manifest(data_dir).bytes_per_token("val") if cfg.train.stage != "ift" else None
    vocab = model_vocab_size(tokenizer)
    if vocab != cfg.model.vocab_size:
        say(dist_info, f"note: model.vocab_size set to {vocab} from the tokenizer (config said {cfg.model.vocab_size})")
        cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab)
    lines = on_main_then_share(dist_info, lambda: preflight(cfg.model, cfg.train, plan, dist_info), "Preflight")
    for line in lines:
        say(dist_info, line)
    init_weights = load_initial_weights(cfg, tokenizer_sha)

    config_dict = to_dict(cfg)
    universal_dir = None
    if resume_from is not None:
        meta = read_meta(resume_from)
        check_resumable(resume_from, meta, config_dict, tokenizer_sha, manifest_sha, dist_info.world_size)
        if load_mode(meta, dist_info.world_size, cfg.train.zero_stage) == "universal":
            universal_dir = on_main_then_share(dist_info, lambda: ensure_universal(resume_from),
                                               "Converting the checkpoint to a universal checkpoint")

    engine = build_engine(cfg, dist_info, init_weights, universal=universal_dir is not None)
    watch = NonfiniteWatch(engine.module, enabled=cfg.train.precision != "fp16")
    train_loader, val_batches = build_loaders(cfg, data_dir, tokenizer, dist_info)

    progress = Progress()
    if resume_from is not None:
        client = load_checkpoint(engine, resume_from, dist_info.rank, universal_dir).get(CLIENT_KEY)
        if client is None:
            raise TrainError(f"Checkpoint '{resume_from}' holds no slm-forge training state ('{CLIENT_KEY}'); "
                             "it was not written by slm train.")
        train_loader.load_state_dict(client["loader"])
        progress = Progress(int(client["step"]), int(client["tokens_seen"]), int(client.get("skipped_steps", 0)))
        say(dist_info, f"resumed from {resume_from} at step {progress.step} ({progress.tokens_seen:,} tokens seen)")

    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        rewind_metrics(run_dir, progress.step)
        if progress.step < plan.max_steps and (run_dir / "DONE").exists():
            (run_dir / "DONE").unlink()
    barrier()

    from train.metrics import MetricsLogger

    logger = MetricsLogger(run_dir, cfg, dist_info.rank)
    try:
        loop = TrainingLoop(cfg, dist_info, plan, engine, watch, train_loader, val_batches, logger, bytes_per_token,
                            started, tokenizer_path, tokenizer_sha, manifest_sha, config_dict)
        return loop.run(progress)
    finally:
        logger.close()


def build_engine(cfg: Config, dist_info: DistInfo, init_weights: Optional[Dict[str, torch.Tensor]],
                 universal: bool) -> Any:
    """The model (seeded init, or the init_from weights) wrapped in a DeepSpeed engine with our AdamW."""
    import deepspeed

    from model import Transformer
    from train.deepspeed_config import build_deepspeed_config, validate_deepspeed_config
    from train.optim import build_optimizer

    seed_everything(cfg.run.seed)
    model = Transformer(cfg.model)
    if init_weights is not None:
        missing, unexpected = model.load_state_dict(init_weights, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and cfg.model.tie_embeddings)]
        if missing or unexpected:
            raise TrainError(f"train.init_from '{cfg.train.init_from}' does not fit the model: missing {missing}, "
                             f"unexpected {unexpected}.")
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.train)
    ds_config = build_deepspeed_config(cfg.train, dist_info.world_size, cfg.deepspeed)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    validate_deepspeed_config(ds_config, cfg.deepspeed)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.train.compile:
        engine.compile()
    return engine


def _grad_norm_now(engine: Any) -> Optional[float]:
    """Global gradient norm before the step, for the engines that do not compute one (ZeRO 0 in fp32)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.nn.utils.get_total_norm(grads))


def _as_float(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


@dataclasses.dataclass
class StepStatus:
    """What every rank agrees on after a step's backward pass, before the optimizer step."""

    mean_loss: float
    """The step's loss averaged over micro-batches and ranks."""
    nonfinite_ranks: int
    """Ranks that saw a non-finite loss or gradient."""
    stop_requested: bool
    """Some rank received SIGTERM/SIGUSR1."""
    out_of_time: bool
    """Some rank's clock passed train.max_time."""


@dataclasses.dataclass
class LogWindow:
    """Accumulates the steps between two log rows (host floats: the loss is known after each step's reduce)."""

    loss_sum: float = 0.0
    finite_steps: int = 0
    steps: int = 0
    seconds: float = 0.0

    def add(self, loss: float, finite: bool, seconds: float) -> None:
        if finite:
            self.loss_sum += loss
            self.finite_steps += 1
        self.steps += 1
        self.seconds += seconds

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.finite_steps if self.finite_steps else float("nan")


class TrainingLoop:
    """The step loop, evaluation, logging and checkpoint saving of one `slm train` invocation."""

    def __init__(self, cfg: Config, dist_info: DistInfo, plan: BatchPlan, engine: Any, watch: NonfiniteWatch,
                 train_loader: Any, val_batches: list, logger: Any, bytes_per_token: Optional[float], started: float,
                 tokenizer_path: Path, tokenizer_sha256: str, manifest_sha256: str, config_dict: Dict[str, Any]):
        from model.stats import flops_per_token
        from train.mfu import peak_flops_per_device

        self.cfg, self.train, self.dist_info, self.plan = cfg, cfg.train, dist_info, plan
        self.engine, self.watch = engine, watch
        self.train_loader, self.val_batches, self.logger = train_loader, val_batches, logger
        self.bytes_per_token, self.started = bytes_per_token, started
        self.tokenizer_path, self.tokenizer_sha256, self.manifest_sha256 = tokenizer_path, tokenizer_sha256, manifest_sha256
        self.config_dict = config_dict
        self.run_dir = Path(cfg.run.dir)
        self.device = dist_info.device
        self.flops_per_token = flops_per_token(cfg.model, plan.seq_len)
        peak = cfg.train.peak_flops
        if peak is None and self.device.type == "cuda":
            peak = peak_flops_per_device(torch.cuda.get_device_name(self.device), cfg.train.precision)
        self.peak_flops = peak
        # ZeRO 0 in fp32 hands DeepSpeed our plain AdamW: no grad norm of its own, no skip of non-finite steps.
        self.plain_optimizer = cfg.train.zero_stage == 0 and cfg.train.precision == "fp32"
        inject = os.environ.get(INJECT_NAN_ENV)
        self.inject_nan_at = int(inject) if inject else None

    # -- one step

    def forward_backward(self, train_iter: Any, number: int) -> torch.Tensor:
        """grad_accum_steps micro-batches of forward and backward; returns the summed loss (on the device)."""
        engine, accum = self.engine, self.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            _, loss = engine(**model_inputs(next(train_iter), self.device))
            if self.inject_nan_at == number:
                loss = loss * float("nan")  # fault injection (SLM_INJECT_NAN_AT_STEP)
            engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro < accum - 1:
                engine.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step
        return loss_sum

    def agree(self, loss_sum: torch.Tensor, stop_requested: bool) -> StepStatus:
        """One all-reduce: mean loss, non-finite ranks, stop signal and time-out, the same on every rank."""
        out_of_time = self.train.max_time is not None and time.time() - self.started >= self.train.max_time
        status = torch.stack([
            loss_sum / self.train.grad_accum_steps, self.watch.nonfinite(loss_sum),
            torch.tensor(float(stop_requested), device=self.device),
            torch.tensor(float(out_of_time), device=self.device),
        ])
        world = self.dist_info.world_size
        if world > 1:
            dist.all_reduce(status)
        loss, nonfinite, stop, timeout = status.tolist()
        return StepStatus(loss / world, int(nonfinite), stop > 0, timeout > 0)

    def handle_nonfinite(self, status: StepStatus, number: int, progress: Progress, last_saved: Optional[int]) -> None:
        """train.on_nonfinite: raise (nothing is saved), or make the coming engine.step() a no-op and count it."""
        if self.train.on_nonfinite == "stop":
            last = f"the newest checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
            raise TrainError(
                f"Non-finite loss or gradient at step {number} (mean loss {status.mean_loss}) on "
                f"{status.nonfinite_ranks} of {self.dist_info.world_size} rank(s); stopped before the optimizer step "
                f"and saved nothing ({last}). Lower train.lr, raise train.warmup_steps, check the data, or set "
                "train.on_nonfinite=skip to skip such steps."
            )
        # ZeRO 1-3 and the bf16/fp16 optimizers skip a step whose gradient norm is not finite by themselves;
        # our plain AdamW leaves parameters without gradients untouched (no moment update, no step count).
        if self.plain_optimizer:
            for param in self.engine.module.parameters():
                param.grad = None
        progress.skipped_steps += 1
        say(self.dist_info, f"step {number}: non-finite loss or gradient, step skipped "
                            f"({progress.skipped_steps} skipped so far)")

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    # -- around the steps

    def log_train(self, number: int, lr: float, grad_norm: Optional[float], progress: Progress, window: LogWindow) -> None:
        from train.mfu import mfu

        tokens_per_second = self.plan.tokens_per_step * window.steps / max(window.seconds, 1e-9)
        row = {
            "step": number, "loss": window.mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens": progress.tokens_seen,
            "tokens_per_second": tokens_per_second,
            "mfu": mfu(self.flops_per_token, tokens_per_second, self.peak_flops, self.dist_info.world_size),
            "step_ms": 1000 * window.seconds / window.steps, "skipped_steps": progress.skipped_steps,
        }
        if row["mfu"] is None:  # no known peak (CPU, unlisted GPU): leave it out rather than log a blank
            del row["mfu"]
        self.logger.log(row)

    def evaluate(self, progress: Progress) -> None:
        result = evaluate(self.engine, self.val_batches, self.device, self.bytes_per_token)
        self.logger.log({"step": progress.step, "tokens": progress.tokens_seen, **result})

    def checkpoint(self, progress: Progress) -> Path:
        # Under one key: DeepSpeed keeps its own top-level keys (e.g. skipped_steps) out of the returned client state.
        client_state = {CLIENT_KEY: {
            "step": progress.step, "tokens_seen": progress.tokens_seen, "skipped_steps": progress.skipped_steps,
            "loader": self.train_loader.state_dict(), "config": self.config_dict,
            "tokenizer_sha256": self.tokenizer_sha256, "manifest_sha256": self.manifest_sha256,
        }}
        meta = {
            "step": progress.step, "tokens_seen": progress.tokens_seen, "config": self.config_dict,
            "tokenizer_sha256": self.tokenizer_sha256, "manifest_sha256": self.manifest_sha256,
            "world_size": self.dist_info.world_size, "zero_stage": self.train.zero_stage,
            "precision": self.train.precision, "skipped_steps": progress.skipped_steps, "saved_at": time.time(),
        }
        started = time.time()
        step_dir = save_checkpoint(self.engine, self.run_dir, progress.step, client_state, meta, self.tokenizer_path,
                                   self.train.keep_checkpoints, self.dist_info)
        say(self.dist_info, f"saved checkpoint {step_dir} ({time.time() - started:.1f} s)")
        return step_dir

    def export(self, step_dir: Path) -> None:
        """train.export_every: a Hugging Face folder of this checkpoint under run.dir/exports/ (rank 0)."""
        from train.export import export

        out_dir = self.run_dir / "exports" / step_dir.name
        on_main_then_share(self.dist_info, lambda: export(step_dir, out_dir, dtype="bf16", verify=False), "Export")
        say(self.dist_info, f"exported {out_dir}")

    def mark_done(self) -> None:
        if self.dist_info.is_main:
            atomic_write_text(self.run_dir / "DONE", f"finished at step {self.plan.max_steps}\n")
        barrier()

    # -- the loop

    def run(self, progress: Progress) -> int:
        """Train from `progress` to max_steps; the exit code of `slm train`."""
        if progress.step >= self.plan.max_steps:
            say(self.dist_info, f"already at step {progress.step} of {self.plan.max_steps}: nothing to train")
            self.mark_done()
            return 0
        stop_request = StopRequest().install()
        try:
            return self._loop(progress, stop_request)
        finally:
            stop_request.restore()

    def _loop(self, progress: Progress, stop_request: StopRequest) -> int:
        from train.schedule import lr_at

        train, max_steps = self.train, self.plan.max_steps
        train_iter = iter(self.train_loader)
        self.engine.train()
        window = LogWindow()
        last_saved = progress.step if progress.step > 0 else None  # the newest checkpoint this run stands on
        while progress.step < max_steps:
            step_started = time.perf_counter()
            number = progress.step + 1  # the step being taken, 1-based as logged and as checkpoint names
            lr = lr_at(progress.step, train)
            self.set_lr(lr)
            status = self.agree(self.forward_backward(train_iter, number), stop_request.requested)
            log_now = number % train.log_every == 0 or number == max_steps
            grad_norm = None
            if status.nonfinite_ranks:
                self.handle_nonfinite(status, number, progress, last_saved)
            elif log_now and self.plain_optimizer:
                grad_norm = _grad_norm_now(self.engine)  # before the step, as DeepSpeed reports its own
            self.engine.step()
            progress.step = number
            progress.tokens_seen += self.plan.tokens_per_step
            window.add(status.mean_loss, finite=not status.nonfinite_ranks, seconds=time.perf_counter() - step_started)
            if log_now:
                if grad_norm is None and not self.plain_optimizer:
                    grad_norm = _as_float(self.engine.get_global_grad_norm())
                self.log_train(number, lr, grad_norm, progress, window)
                window = LogWindow()

            finished = number >= max_steps
            timed_out = status.out_of_time and not finished
            if (finished or timed_out or number % train.eval_every == 0) and not status.stop_requested:
                self.evaluate(progress)
            export_now = train.export_every > 0 and number % train.export_every == 0
            if finished or timed_out or status.stop_requested or export_now or number % train.ckpt_every == 0:
                step_dir = self.checkpoint(progress)
                last_saved = number
                if export_now:
                    self.export(step_dir)
            if status.stop_requested:
                say(self.dist_info, f"stopped by signal after step {number}; exit code {EXIT_PREEMPTED} "
                                    "(start the same command again to resume)")
                return EXIT_PREEMPTED
            if timed_out:
                say(self.dist_info, f"train.max_time ({train.max_time} s) spent: stopped cleanly after step {number}")
                return 0
        self.mark_done()
        say(self.dist_info, f"finished {max_steps} steps ({progress.tokens_seen:,} tokens)")
        return 0
