"""`slm train`: set up the run (`train.startup`), then the step loop (`train.loop`) with its components
(`train.standard_components`, on the interface of `train.components`).

Everything the run writes lives under `run.dir`, except the checkpoints when checkpoint.dir is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from data_pipeline.tokenizer import tokenizers_single_threaded
from train.checkpoint import CheckpointSaver, checkpoints_location
from train.components import Component, LoopRun
from train.config import Config
from train.deepspeed_config import plain_optimizer
from train.distributed import (
    DistInfo,
    on_main_then_share,
    setup_distributed,
    teardown_distributed,
    with_auto_resolved,
)
from train.errors import TrainError
from train.loop import TrainingLoop
from train.metrics import MetricsLogger
from train.run_lock import acquire_run_lock, release_run_lock
from train.standard_components import standard_components
from train.startup import RunSetup, remote_location, set_up_run


def run_training(cfg: Config, extra_components: Sequence[Component] = ()) -> int:
    """Train according to `cfg`; 0 when finished (or train.max_time spent), EXIT_PREEMPTED after a stop signal.

    `extra_components` run after the standard ones (`train.standard_components.COMPONENTS`), at the same points.
    """
    tokenizers_single_threaded()
    dist_info = setup_distributed(cfg.train)
    cfg = with_auto_resolved(cfg, dist_info.device.type, dist_info.is_main)
    lock = None
    try:
        lock = on_main_then_share(dist_info, lambda: acquire_run_lock(Path(cfg.run.dir)), "Locking run.dir")
        return _train(cfg, dist_info, extra_components)
    finally:
        if dist_info.is_main:
            release_run_lock(lock)
        teardown_distributed()


def loop_run(setup: RunSetup, dist_info: DistInfo) -> LoopRun:
    """The state the step loop works on, from a set-up run: its checkpoint saver (resuming its rotation where the run
    left off) and its metrics logger included."""
    cfg = setup.cfg
    checkpoints = CheckpointSaver(
        setup.engine,
        Path(checkpoints_location(cfg.checkpoint.dir, Path(cfg.run.dir))),
        setup.identity,
        setup.train_loader,
        setup.data.tokenizer_path,
        cfg.checkpoint.keep,
        dist_info,
        last_saved=setup.progress.step if setup.progress.step > 0 else None,
        last_dir=setup.resumed_from,
        remote=remote_location(cfg),
        background=cfg.checkpoint.async_save,
    )
    return LoopRun(
        cfg,
        dist_info,
        setup.plan,
        setup.engine,
        setup.progress,
        MetricsLogger(Path(cfg.run.dir), cfg, dist_info.rank),
        checkpoints,
        setup.val_batches,
        setup.data.bytes_per_token,
        setup.started,
        plain_optimizer=plain_optimizer(cfg.train),
        val_sources=setup.val_sources,
    )


def _train(cfg: Config, dist_info: DistInfo, extra_components: Sequence[Component]) -> int:
    setup = set_up_run(cfg, dist_info)
    cfg = setup.cfg
    run = loop_run(setup, dist_info)
    checkpoints = run.checkpoints
    try:
        components = standard_components(cfg) + list(extra_components)
        code = TrainingLoop(run, setup.train_loader, components).run_steps()
        checkpoints.wait()  # the save in flight (checkpoint.async_save) finishes before the run ends
        if checkpoints.failed:
            raise TrainError(f"The run ended, but {checkpoints.failed}.")
        return code
    finally:
        checkpoints.wait()
        run.logger.close()
