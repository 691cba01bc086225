"""Whether and from where a run resumes: checkpoint.resume, and refusal of a checkpoint that does not fit the run.

A checkpoint continues a run only with the same model shape (`train.handoff.shapes`, max_seq_len included),
tokenizer, data manifest and precision. A different world size or ZeRO stage within 1-3 goes through a DeepSpeed
universal checkpoint; ZeRO 0 <-> 1-3 is refused (DeepSpeed cannot convert those optimizer states). Before
any of that, the chosen checkpoint's files must match its own record (`intact_resume`); with checkpoint.resume=auto a
damaged newest checkpoint is skipped, saying so, for the previous complete one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from common.log import say
from data_pipeline.storage.store import is_remote
from train.checkpoint.files import newest_intact, verify_checkpoint
from train.checkpoint.folders import complete_checkpoints, find_checkpoint
from train.checkpoint.layout import checkpoints_dir, step_of, step_tag
from train.checkpoint.record import CheckpointRecord, read_record
from train.checkpoint.remote import RemoteCheckpoints, fetch_checkpoint_url, split_step_url
from train.config import CheckpointConfig
from train.errors import TrainError
from train.handoff.shapes import shape_differences
from train.metrics import METRICS_FILE

RESUME_OFF = ("false", "no", "off", "0", "never")
RESUME_AUTO = ("auto", "true", "yes", "on", "1")


def resolve_resume(resume: str, run_dir: Path, ckpt_dir: Optional[Path] = None) -> Optional[Path]:
    """The step folder to resume from (None for a fresh start) according to checkpoint.resume; `ckpt_dir` is the
    run's checkpoint folder (checkpoint.dir; run.dir/checkpoints when None)."""
    ckpt_dir = checkpoints_dir(run_dir) if ckpt_dir is None else ckpt_dir
    value = str(resume).strip()
    if value.lower() in RESUME_AUTO:
        return find_checkpoint(ckpt_dir)
    if value.lower() in RESUME_OFF:
        leftovers = [str(p) for p in (ckpt_dir, run_dir / METRICS_FILE) if p.exists()]
        if leftovers:
            raise TrainError(
                f"checkpoint.resume is false but run.dir '{run_dir}' already holds {', '.join(leftovers)}; "
                "choose an empty run.dir, delete it, or set checkpoint.resume=auto to continue that run."
            )
        return None
    found = find_checkpoint(value)
    if found is None:
        raise TrainError(
            f"checkpoint.resume is '{value}', but no complete checkpoint is there; expected a run dir, its checkpoints "
            "folder or a step_XXXXXXXX folder containing COMPLETE (or checkpoint.resume=auto / false)."
        )
    refuse_newer(value, step_of(found), [step_of(p) for p in complete_checkpoints(ckpt_dir)], str(ckpt_dir))
    return found


def refuse_newer(value: str, step: int, run_steps: List[int], ckpt_dir: str) -> None:
    """checkpoint.resume names step `step`, but the run's checkpoint folder holds newer complete checkpoints that
    the run would overwrite as it passes their steps: refused."""
    newer = [step_tag(s) for s in run_steps if s > step]
    if newer:
        raise TrainError(
            f"checkpoint.resume is '{value}' (step {step}), but the run's checkpoint folder '{ckpt_dir}' holds newer "
            f"complete checkpoints ({', '.join(newer)}) that this run would overwrite as it passes their steps. Move "
            f"them out of {ckpt_dir} first if you mean to go back, resume the newest (checkpoint.resume=auto), "
            "or resume into another run.dir (and checkpoint.dir)."
        )


def intact_resume(
    checkpoint: CheckpointConfig, run_dir: Path, chosen: Optional[Path], ckpt_dir: Optional[Path] = None
) -> Optional[Path]:
    """`chosen` (from checkpoint.resume) if its files match its meta.json; with resume=auto the newest intact one."""
    if chosen is None:
        return None
    hashes = checkpoint.verify_hashes
    if str(checkpoint.resume).strip().lower() in RESUME_AUTO:
        candidates = [
            p
            for p in reversed(
                complete_checkpoints(checkpoints_dir(run_dir) if ckpt_dir is None else ckpt_dir)
            )
            if step_of(p) <= step_of(chosen)
        ]
        return newest_intact(candidates, hashes, say)
    verify_checkpoint(chosen, read_record(chosen), hashes)
    return chosen


def remote_resume(
    checkpoint: CheckpointConfig,
    run_dir: Path,
    ckpt: Union[Path, RemoteCheckpoints],
    storage_options: Optional[Dict[str, Any]],
    cache_dir: Optional[str],
) -> Tuple[Optional[Path], Optional[str]]:
    """checkpoint.resume when checkpoint.dir (`ckpt`) or checkpoint.resume is a URL (rank 0): (the verified local
    copy to resume from or None, the URL of the checkpoint folder it was fetched from, for the other nodes)."""
    value, hashes = str(checkpoint.resume).strip(), checkpoint.verify_hashes
    run_steps = (
        [step_of(Path(tag)) for tag in ckpt.complete_steps()]
        if isinstance(ckpt, RemoteCheckpoints)
        else [step_of(p) for p in complete_checkpoints(ckpt)]
    )
    where = ckpt.url if isinstance(ckpt, RemoteCheckpoints) else str(ckpt)
    if value.lower() in RESUME_AUTO and isinstance(ckpt, RemoteCheckpoints):
        return ckpt.newest_intact(hashes), ckpt.url
    if value.lower() in RESUME_AUTO:
        return intact_resume(checkpoint, run_dir, find_checkpoint(ckpt), ckpt), None
    if value.lower() in RESUME_OFF:
        leftovers = ([where] if run_steps else []) + [str(p) for p in (run_dir / METRICS_FILE,) if p.exists()]
        if leftovers:
            raise TrainError(
                f"checkpoint.resume is false but {', '.join(leftovers)} already hold(s) an earlier run's checkpoints "
                "or records; choose an empty run.dir and checkpoint.dir, or set checkpoint.resume=auto to continue "
                "that run."
            )
        return None, None
    folder = split_step_url(value)[0] if is_remote(value) else None
    found = (
        fetch_checkpoint_url(value, storage_options, cache_dir, hashes) if folder else find_checkpoint(value)
    )
    if found is None:
        raise TrainError(
            f"checkpoint.resume is '{value}', but no complete checkpoint is there; expected a checkpoint folder or a "
            "step_XXXXXXXX folder containing COMPLETE (or checkpoint.resume=auto / false)."
        )
    verify_checkpoint(found, read_record(found), hashes)
    refuse_newer(value, step_of(found), run_steps, where)
    return found, folder


def load_mode(saved: CheckpointRecord, world_size: int, zero_stage: int) -> str:
    """How a checkpoint loads into a run with this layout: "plain", "universal" or "refuse".

    Same world size and ZeRO stage: plain. ZeRO 0 keeps the whole optimizer state in one file, so it
    loads plainly on any world size. ZeRO 1-3 shards it by rank: a different world size or stage goes
    through a DeepSpeed universal checkpoint. Between ZeRO 0 and 1-3 there is no conversion.
    """
    if saved.world_size == world_size and saved.zero_stage == zero_stage:
        return "plain"
    if saved.zero_stage == 0 and zero_stage == 0:
        return "plain"
    if saved.zero_stage >= 1 and zero_stage >= 1:
        return "universal"
    return "refuse"


def differences(
    saved: CheckpointRecord,
    config: Dict[str, Any],
    tokenizer_sha256: str,
    manifest_sha256: Optional[str],
    world_size: int,
) -> List[str]:
    """Human-readable reasons why the checkpoint cannot continue this run (empty when it can); `config` is this
    run's config dict with its plan applied (train.plan.effective_config), as the record's identity applies the
    checkpoint's (of any config layout)."""
    found: List[str] = []
    for key, saved_value, wanted in shape_differences(saved.identity.model, config.get("model", {})):
        found.append(f"model.{key} is {saved_value!r} in the checkpoint but {wanted!r} in this run")
    if saved.tokenizer_sha256 != tokenizer_sha256:
        found.append(
            f"the tokenizer differs (sha256 {str(saved.tokenizer_sha256)[:12]}... in the checkpoint, "
            f"{tokenizer_sha256[:12]}... in data.dir)"
        )
    if manifest_sha256 is not None and saved.manifest_sha256 != manifest_sha256:
        found.append(
            f"the data manifest differs (sha256 {str(saved.manifest_sha256)[:12]}... in the checkpoint, "
            f"{manifest_sha256[:12]}... in data.dir): the loader position would point into different data"
        )
    wanted_train, wanted_optim = config.get("train", {}), config.get("optim", {})
    if saved.precision != wanted_train.get("precision"):
        found.append(
            f"train.precision is {saved.precision!r} in the checkpoint but "
            f"{wanted_train.get('precision')!r} in this run"
        )
    saved_optimizer = saved.identity.optimizer
    if saved_optimizer != wanted_optim.get("name", "adamw"):
        found.append(
            f"optim.name is {saved_optimizer!r} in the checkpoint but {wanted_optim.get('name')!r} "
            "in this run (their optimizer states differ)"
        )
    mode = load_mode(saved, world_size, int(wanted_train.get("zero_stage", -1)))
    layout = (
        f"the checkpoint was written with ZeRO stage {saved.zero_stage} on {saved.world_size} rank(s) "
        f"and this run uses ZeRO stage {wanted_train.get('zero_stage')} on {world_size} rank(s)"
    )
    if mode == "refuse":
        found.append(f"{layout}: DeepSpeed cannot convert between ZeRO 0 and ZeRO 1-3 optimizer states")
    if mode == "universal" and saved_optimizer == "muon":
        found.append(
            f"{layout}, which needs a universal checkpoint, and DeepSpeed 0.19.8's converter cannot convert "
            "Muon's optimizer state (it expects AdamW's exp_avg); to change the layout, start a cpt run "
            "from it (train.stage=cpt train.init_from=...: fresh optimizer)"
        )
    return found


def check_resumable(
    step_dir: Path,
    saved: CheckpointRecord,
    config: Dict[str, Any],
    tokenizer_sha256: str,
    manifest_sha256: Optional[str],
    world_size: int,
) -> None:
    """Raise a TrainError listing every difference between the checkpoint and this run."""
    found = differences(saved, config, tokenizer_sha256, manifest_sha256, world_size)
    if found:
        raise TrainError(
            f"Refusing to resume from checkpoint '{step_dir}': " + "; ".join(found) + ". "
            "Resume with the configuration and data the checkpoint was trained with, start a fresh run.dir, "
            "or use train.stage=cpt with train.init_from to start new training from its weights."
        )
