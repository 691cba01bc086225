"""Setting up one `slm train` run, before the first step: the run's plan, resume resolution, the prepared data
(launch/ prepares a missing data.dir before this runs), the tokenizer identity, preflight, initial weights, the DeepSpeed engine, the loaders, and the
resumed progress. `set_up_run` returns it all as one `RunSetup`; `train.loop` takes it from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from common.atomic import atomic_write_text
from common.files import file_sha256
from common.log import say
from data_pipeline.errors import DataError
from data_pipeline.format.manifest import load_manifest, manifest_sha256
from data_pipeline.format.names import MANIFEST, TOKENIZER
from data_pipeline.instruct.data import build_instruct_loader
from data_pipeline.loading.documents import add_document_ids, document_masked
from data_pipeline.loading.loader import build_loader
from data_pipeline.sources.corpus import source_weights
from data_pipeline.storage.cache import default_cache_dir, local_copy
from data_pipeline.storage.store import DataStore, is_remote
from data_pipeline.tokenizer import eot_id, load_tokenizer, model_vocab_size
from model import Transformer
from train.batch import Batch, take_batches
from train.checkpoint import (
    CheckpointRecord,
    Progress,
    RemoteCheckpoints,
    RunIdentity,
    check_resumable,
    checkpoints_location,
    ensure_universal,
    intact_resume,
    load_checkpoint,
    load_mode,
    read_record,
    remote_resume,
    resolve_resume,
)
from train.config import Config, to_dict, to_yaml
from train.deepspeed_config import build_deepspeed_config, validate_deepspeed_config
from train.distributed import DistInfo, barrier, on_main_then_share
from train.environment import write_environment
from train.errors import TrainError
from train.evaluate import ValSource
from train.handoff.init_from import load_init_weights
from train.handoff.remote_export import fetch_weights
from train.handoff.shapes import shape_differences
from train.metrics import rewind_metrics, set_aside_history
from train.optim import build_optimizer, describe_muon, param_groups, set_compile_stance
from train.plan import RunPlan, plan_run, write_plan
from train.preflight import choose_activation_checkpointing, least_budget_over_ranks, preflight


@dataclasses.dataclass
class DataSetup:
    """The prepared data a run trains on, and its identity."""

    dir: Any
    """data.dir as a data_pipeline.storage.store.DataStore (local folder or URL) with manifest.json and tokenizer.json."""
    tokenizer_path: Path
    """A local path of data.dir's tokenizer.json (a fresh copy in data.cache_dir when data.dir is a URL)."""
    tokenizer: Any
    """The loaded tokenizers.Tokenizer."""
    tokenizer_sha256: str
    """sha256 of tokenizer.json."""
    manifest_sha256: Optional[str]
    """sha256 of manifest.json."""
    bytes_per_token: Optional[float]
    """Validation text bytes per token (None for instruction data)."""


@dataclasses.dataclass
class RunSetup:
    """Everything the loop needs, built once per invocation."""

    cfg: Config
    """The config as loaded (resolved, validated, never rewritten)."""
    plan: RunPlan
    """What the run derived: batch arithmetic, max_steps, world size, vocab_size (recorded beside the config)."""
    data: DataSetup
    """Prepared data and its identity."""
    engine: Any
    """The DeepSpeed engine."""
    train_loader: Any
    """The resumable training loader."""
    val_batches: List[Batch]
    """This rank's fixed validation batches."""
    val_sources: List[ValSource]
    """With several data sources, each one's own validation batches (val_batches then holds them all)."""
    progress: Progress
    """Where the run stands (0 for a fresh start)."""
    identity: RunIdentity
    """What every checkpoint of this run records and a resume must match."""
    started: float
    """time.time() at the start of this invocation."""
    resumed_from: Optional[Path] = None
    """The checkpoint folder this start resumed from (None on a fresh start)."""


def load_data(cfg: Config, dist_info: DistInfo) -> DataSetup:
    """Identify the prepared data: tokenizer, its sha256, the manifest's sha256 and bytes per token. data.dir
    must hold prepared data (`slm prepare`, or `slm train`, which prepares a missing data.dir first)."""
    data_dir = DataStore(cfg.data.dir, cfg.data.storage_options)
    if (
        data_dir.remote
        and dist_info.world_size > 1
        and cfg.data.cache_dir is None
        and cfg.data.cache_limit is None
    ):
        raise DataError(
            f"data.dir is the URL {cfg.data.dir} and this run has {dist_info.world_size} ranks, but neither "
            "data.cache_dir nor data.cache_limit is set: every node would cache the whole corpus in its temp folder "
            f"({default_cache_dir()}) without a bound. Set data.cache_dir to node-local disk with room and/or "
            "data.cache_limit to the bytes it may hold (ranged reads past it)."
        )
    if not data_dir.exists(MANIFEST):
        raise DataError(
            f"No {MANIFEST} in data.dir {data_dir}: it holds no prepared data. Run `slm prepare CONFIG` "
            f"first (`slm train CONFIG` prepares a missing data.dir before it trains)."
        )
    tokenizer_path = local_copy(data_dir, TOKENIZER, cfg.data.cache_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    bytes_per_token = load_manifest(data_dir).bytes_per_token("val") if cfg.train.stage != "ift" else None
    return DataSetup(
        data_dir,
        tokenizer_path,
        tokenizer,
        file_sha256(tokenizer_path),
        manifest_sha256(data_dir),
        bytes_per_token,
    )


def build_loaders(
    cfg: Config, data_dir: Any, tokenizer: Any, dist_info: DistInfo, pooled_val: bool = True
) -> tuple:
    """(train loader, fixed list of this rank's validation batches drawn from the pooled validation split;
    empty without pooled_val, when each source has its own: build_val_sources)."""
    seq_len, micro = cfg.model.max_seq_len, cfg.train.micro_batch_size
    # eval.batches counts micro-batches over all ranks: the loaders' global cursor then hands every
    # world size the same validation samples (exactly, when the world size divides eval.batches).
    val_batches_per_rank = math.ceil(cfg.eval.batches / dist_info.world_size)
    if cfg.train.stage == "ift":

        def instruct(split: str) -> Any:
            return build_instruct_loader(
                cfg.ift, tokenizer, split, seq_len, micro, dist_info.rank, dist_info.world_size, cfg.run.seed
            )

        return instruct("train"), take_batches(instruct("val"), val_batches_per_rank)
    weights = source_weights(cfg.data) if len(cfg.data.sources) > 1 else None
    train_loader = build_loader(
        data_dir,
        "train",
        seq_len,
        micro,
        dist_info.rank,
        dist_info.world_size,
        cfg.run.seed,
        num_workers=cfg.data.num_workers,
        weights=weights,
        verify_checksums=cfg.data.verify_checksums,
        cache_dir=cfg.data.cache_dir,
        cache_limit=cfg.data.cache_limit,
    )
    val_batches: List[Batch] = []
    if pooled_val:
        val_batches = take_batches(val_loader(cfg, data_dir, dist_info), val_batches_per_rank)
    if cfg.data.document_mask:  # attention within documents, positions restarting at each EOT
        return document_masked(train_loader, val_batches, eot_id(tokenizer))
    return train_loader, val_batches


def val_loader(
    cfg: Config, data_dir: Any, dist_info: DistInfo, weights: Optional[Dict[str, float]] = None
) -> Any:
    """This rank's loader of the validation split (all sources mixed as prepared, or as `weights` say)."""
    return build_loader(
        data_dir,
        "val",
        cfg.model.max_seq_len,
        cfg.train.micro_batch_size,
        dist_info.rank,
        dist_info.world_size,
        cfg.run.seed,
        weights=weights,
        cache_dir=cfg.data.cache_dir,
        cache_limit=cfg.data.cache_limit,
    )


def build_val_sources(cfg: Config, data_dir: Any, tokenizer: Any, dist_info: DistInfo) -> List[ValSource]:
    """With several prepared sources (not ift): each source's own fixed validation batches, eval.batches of
    them over all ranks per source, drawn by a loader that weights that source alone. A source whose
    validation split holds no window of seq_len + 1 tokens is left out (said once)."""
    manifest = load_manifest(data_dir)
    names = manifest.source_names()
    if cfg.train.stage == "ift" or len(names) < 2:
        return []
    seq_len = cfg.model.max_seq_len
    per_rank = math.ceil(cfg.eval.batches / dist_info.world_size)
    sources = []
    for name in names:
        shards = manifest.shards_of("val", name)
        tokens = sum(s.tokens for s in shards)
        if tokens < seq_len + 1:
            say(
                f"validation per source: '{name}' has {tokens} validation tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; it is left out of the per-source and mixed figures",
                dist_info.is_main,
            )
            continue
        loader = val_loader(cfg, data_dir, dist_info, {other: float(other == name) for other in names})
        batches = take_batches(loader, per_rank)
        if cfg.data.document_mask:
            batches = [add_document_ids(batch, eot_id(tokenizer)) for batch in batches]
        sources.append(ValSource(name, batches, tokens, sum(s.text_bytes for s in shards)))
    return sources


def local_init_source(cfg: Config, dist_info: DistInfo) -> str:
    """train.init_from as a local path: an export or checkpoint URL is copied into the node-local cache by each
    node's first rank (the others wait, then find the copy complete)."""
    source = str(cfg.train.init_from)
    if not is_remote(source):
        return source
    if dist_info.local_rank == 0:
        fetch_weights(source, cfg.data.storage_options, cfg.data.cache_dir)
    barrier()
    return str(fetch_weights(source, cfg.data.storage_options, cfg.data.cache_dir))


def load_initial_weights(
    cfg: Config, plan: RunPlan, dist_info: DistInfo, tokenizer_sha256: str
) -> Optional[Dict[str, torch.Tensor]]:
    """cpt/ift: the weights of train.init_from, checked against this run's tokenizer and model shape."""
    if cfg.train.stage == "pretrain":
        return None
    if not cfg.train.init_from:
        raise TrainError(
            f"train.stage is {cfg.train.stage} but train.init_from is not set; expected the run dir, "
            "checkpoint or export whose weights this stage continues from."
        )
    state_dict, init_cfg, init_sha = load_init_weights(local_init_source(cfg, dist_info))
    if init_sha is not None and init_sha != tokenizer_sha256:
        raise TrainError(
            f"train.init_from '{cfg.train.init_from}' was trained with another tokenizer (sha256 {init_sha[:12]}...) "
            f"than {cfg.data.dir}/tokenizer.json ({tokenizer_sha256[:12]}...); the token ids would mean different "
            "things. Prepare the data with tokenizer.path set to the init source's tokenizer.json."
        )
    diffs = [
        f"model.{key} is {saved!r} there but {wanted!r} here"
        for key, saved, wanted in shape_differences(
            init_cfg, plan.model(cfg.model), allow_seq_len_change=True
        )
    ]
    if diffs:
        raise TrainError(
            f"train.init_from '{cfg.train.init_from}' has another model shape: "
            + "; ".join(diffs)
            + ". Use the same model settings as the run it comes from."
        )
    return state_dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded_model(cfg: Config, plan: RunPlan, init_weights: Optional[Dict[str, torch.Tensor]]) -> Transformer:
    """The run's model: the seeded random init (every rank draws the same weights), then the train.init_from
    weights over it (cpt/ift). Apart from the engine, so the dry run can build it without filling it."""
    seed_everything(cfg.run.seed)
    model = Transformer(plan.model(cfg.model))
    if init_weights is not None:
        missing, unexpected = model.load_state_dict(init_weights, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and cfg.model.tie_embeddings)]
        if missing or unexpected:
            raise TrainError(
                f"train.init_from '{cfg.train.init_from}' does not fit the model: missing {missing}, "
                f"unexpected {unexpected}."
            )
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    return model


def deepspeed_engine(cfg: Config, dist_info: DistInfo, model: Transformer, universal: bool) -> Any:
    """`model` and its optimizer wrapped by deepspeed.initialize for this run's ZeRO stage and world size (the
    buckets sized from model.cfg; `universal`: the engine will load a universal checkpoint)."""
    import deepspeed  # heavy: imported when an engine is built

    set_compile_stance(dist_info.device, cfg.train.compile, muon=cfg.optim.name == "muon")
    optimizer = build_optimizer(model, cfg.optim)
    ds_config = build_deepspeed_config(
        cfg.train,
        cfg.optim,
        dist_info.world_size,
        cfg.deepspeed,
        model=model.cfg,
        device_type=dist_info.device.type,
        skips_steps=cfg.skips_steps,
    )
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    validate_deepspeed_config(ds_config, cfg.deepspeed)
    # BF16_Optimizer (ZeRO-1 in bf16) prints memory lines with print(): they are status, so stderr, not stdout.
    with contextlib.redirect_stdout(sys.stderr):
        if optimizer is None:  # Muon: DeepSpeed builds it from ds_config over our decay / no-decay groups
            engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config
            )
        else:
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if dist_info.world_size == 1 and cfg.train.zero_stage == 0:
        # ZeRO 0 all-reduces every gradient after backward (flatten, a one-rank all_reduce, copy back): the
        # identity on one rank, and 3% of a tiny-preset step (bench/train_step_profile.py). (Not at ZeRO 1 in
        # bf16, although BF16_Optimizer takes the same path: it rounds the fp32-accumulated gradients to bf16
        # for the all-reduce, so there it is not the identity.)
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        engine.compile()
    return engine


def build_engine(
    cfg: Config,
    plan: RunPlan,
    dist_info: DistInfo,
    init_weights: Optional[Dict[str, torch.Tensor]],
    universal: bool,
) -> Any:
    """The model (seeded init, or the init_from weights) wrapped in a DeepSpeed engine with its optimizer."""
    return deepspeed_engine(cfg, dist_info, seeded_model(cfg, plan, init_weights), universal)


def settle_vocab(cfg: Config, plan: RunPlan, dist_info: DistInfo, data: DataSetup) -> RunPlan:
    """The plan with the model's vocab_size from the tokenizer (rounded up as the data pipeline does)."""
    vocab = model_vocab_size(data.tokenizer)
    if vocab != cfg.model.vocab_size:
        say(
            f"note: model.vocab_size set to {vocab} from the tokenizer (config said {cfg.model.vocab_size})",
            dist_info.is_main,
        )
    return dataclasses.replace(plan, vocab_size=vocab)


def remote_location(cfg: Config) -> Optional[RemoteCheckpoints]:
    """checkpoint.dir as a URL with its node-local folders (None when it is a local folder)."""
    location = checkpoints_location(cfg.checkpoint.dir, Path(cfg.run.dir))
    if not is_remote(location):
        return None
    return RemoteCheckpoints(location, cfg.data.storage_options, cfg.data.cache_dir)


def find_resume(cfg: Config, dist_info: DistInfo) -> Optional[Path]:
    """The intact checkpoint to resume from (checkpoint.resume), as a local folder on every node: checkpoints on a
    URL are chosen and fetched by rank 0, then fetched once by each other node's first rank."""
    run_dir = Path(cfg.run.dir)
    remote = remote_location(cfg)
    ckpt_dir = Path(checkpoints_location(cfg.checkpoint.dir, run_dir))
    if remote is None and not is_remote(str(cfg.checkpoint.resume)):
        chosen = resolve_resume(cfg.checkpoint.resume, run_dir, ckpt_dir)
        return on_main_then_share(
            dist_info,
            lambda: intact_resume(cfg.checkpoint, run_dir, chosen, ckpt_dir),
            "Checking the checkpoint's files",
        )
    found, folder = on_main_then_share(
        dist_info,
        lambda: remote_resume(
            cfg.checkpoint, run_dir, remote or ckpt_dir, cfg.data.storage_options, cfg.data.cache_dir
        ),
        "Fetching the checkpoint",
    )
    if found is not None and folder is not None and not dist_info.is_main:
        node_copies = RemoteCheckpoints(folder, cfg.data.storage_options, cfg.data.cache_dir)
        if dist_info.local_rank == 0:
            node_copies.fetch(found.name)
        found = node_copies.copy_dir(found.name)  # this node's copy: its cache need not be where rank 0's is
    barrier()
    return found


def fetched_resume(cfg: Config) -> bool:
    """Whether the checkpoint a run resumes from is a node-local copy of one on a URL (one copy per node)."""
    return remote_location(cfg) is not None or is_remote(str(cfg.checkpoint.resume))


def resume_into(
    engine: Any,
    train_loader: Any,
    resume_from: Path,
    record: CheckpointRecord,
    universal_dir: Optional[Path],
    dist_info: DistInfo,
) -> Progress:
    """Load a checkpoint (`record` is its meta.json) into the engine and the loader; the progress it holds."""
    loader_state = record.loader_state()
    load_checkpoint(engine, resume_from, dist_info.rank, universal_dir)
    train_loader.load_state_dict(loader_state)
    progress = record.progress
    say(
        f"resumed from {resume_from} at step {progress.step} ({progress.tokens_seen:,} tokens seen)",
        dist_info.is_main,
    )
    return progress


def with_activation_checkpointing(
    cfg: Config, plan: RunPlan, dist_info: DistInfo, budget_bytes: Optional[int]
) -> Config:
    """`cfg` with train.activation_checkpointing=null (auto) decided for this run's memory, and said."""
    chosen = choose_activation_checkpointing(
        plan.model(cfg.model), cfg.train, plan, dist_info.world_size, budget_bytes
    )
    if cfg.train.activation_checkpointing is None:
        why = "the estimate does not fit without it" if chosen else "the estimate fits without it"
        say(f"train.activation_checkpointing=auto -> {'on' if chosen else 'off'}: {why}", dist_info.is_main)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=chosen))


def set_up_run(cfg: Config, dist_info: DistInfo) -> RunSetup:
    """Everything before the first step, in the order that fails fastest (config, data, memory, weights)."""
    started = time.time()
    if cfg.train.stage == "pretrain" and cfg.train.init_from:
        raise TrainError(
            "train.init_from is set but train.stage is pretrain; use train.stage=cpt (or ift) to start "
            "from those weights, or remove train.init_from."
        )
    plan = plan_run(cfg, dist_info.world_size)
    resume_from = find_resume(cfg, dist_info)
    data = load_data(cfg, dist_info)
    plan = settle_vocab(cfg, plan, dist_info, data)
    budget = least_budget_over_ranks(dist_info)
    cfg = with_activation_checkpointing(cfg, plan, dist_info, budget[0])
    for line in on_main_then_share(
        dist_info, lambda: preflight(plan.model(cfg.model), cfg.train, plan, dist_info, budget), "Preflight"
    ):
        say(line, dist_info.is_main)
    init_weights = load_initial_weights(cfg, plan, dist_info, data.tokenizer_sha256)

    identity = RunIdentity(
        to_dict(cfg),
        data.tokenizer_sha256,
        data.manifest_sha256,
        dist_info.world_size,
        cfg.train.zero_stage,
        cfg.train.precision,
        plan.to_dict(),
    )
    universal_dir, record = None, None
    if resume_from is not None:
        record = read_record(resume_from)
        check_resumable(
            resume_from,
            record,
            identity.effective_config,
            data.tokenizer_sha256,
            data.manifest_sha256,
            dist_info.world_size,
        )
        if load_mode(record, dist_info.world_size, cfg.train.zero_stage) == "universal":
            universal_dir = on_main_then_share(
                dist_info,
                lambda: ensure_universal(resume_from),
                "Converting the checkpoint to a universal checkpoint",
            )
            if fetched_resume(cfg) and not dist_info.is_main:  # converted in this node's local copy
                if dist_info.local_rank == 0:
                    ensure_universal(resume_from)
                universal_dir = resume_from / universal_dir.name
            barrier()

    engine = build_engine(cfg, plan, dist_info, init_weights, universal=universal_dir is not None)
    if cfg.optim.name == "muon":
        say(describe_muon(engine.module, cfg.optim), dist_info.is_main)
    val_sources = build_val_sources(cfg, data.dir, data.tokenizer, dist_info)
    train_loader, val_batches = build_loaders(
        cfg, data.dir, data.tokenizer, dist_info, pooled_val=not val_sources
    )
    if val_sources:
        val_batches = [batch for source in val_sources for batch in source.batches]
    progress = Progress()
    if resume_from is not None and record is not None:
        progress = resume_into(engine, train_loader, resume_from, record, universal_dir, dist_info)
    write_run_dir(cfg, plan, dist_info, progress)
    return RunSetup(
        cfg,
        plan,
        data,
        engine,
        train_loader,
        val_batches,
        val_sources,
        progress,
        identity,
        started,
        resume_from,
    )


def write_run_dir(cfg: Config, plan: RunPlan, dist_info: DistInfo, progress: Progress) -> None:
    """run.dir/config.yaml (as loaded), plan.json (what the run derived) and environment.json of this start, and metrics.jsonl cut
    back to the resumed step (rank 0; all wait)."""
    if dist_info.is_main:
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if progress.step == 0:
            kept = set_aside_history(run_dir)
            if kept is not None:
                say(
                    f"a fresh start in {run_dir}, which holds an earlier run's records but no complete checkpoint "
                    f"to resume from: its metrics.jsonl, config.yaml and plan.json are kept in {kept}"
                )
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        write_plan(run_dir, plan)
        write_environment(run_dir, dist_info.device, dist_info.world_size)
        rewind_metrics(run_dir, progress.step)
    barrier()
