"""The checkpoint format and everything that reads or writes it; nothing outside this package knows a file name
of a checkpoint or walks its meta.json.

  layout      file and folder names (ours and DeepSpeed's), step folder naming, COMPLETE, `latest`
  record      CheckpointRecord (meta.json, typed), Progress, RunIdentity; read_record
  files       the size + hash record of every file, and its verification
  safe_load   weights_only=True loads; the pickle scan before DeepSpeed unpickles
  rng_state   every RNG's state as tensors and plain types (rng_rank*.pt)
  folders     finding the complete checkpoints of a run, the `latest` pointer, rotation
  save        save_checkpoint (complete or invisible), CheckpointSaver
  load        load into a DeepSpeed engine; consolidated fp32 weights
  universal   conversion to a DeepSpeed universal checkpoint
  remote      checkpoints on an object store: staging, upload (COMPLETE last), rotation, node-local copies
  resume      checkpoint.resume resolution (falling back past a damaged checkpoint) and the fit checks
"""

from train.checkpoint.files import CheckpointDamaged, record_files, verify_checkpoint
from train.checkpoint.folders import complete_checkpoints, find_checkpoint, prune_checkpoints, read_latest
from train.checkpoint.layout import (
    CHECKPOINTS,
    COMPLETE,
    DS_MODEL_STATES,
    LATEST,
    META,
    TOKENIZER,
    checkpoints_dir,
    checkpoints_location,
    has_record,
    is_complete,
    looks_like_checkpoint,
    rng_file,
    step_of,
    step_tag,
    tokenizer_file,
)
from train.checkpoint.load import consolidate_checkpoint, load_checkpoint, load_module_weights
from train.checkpoint.record import CheckpointRecord, Progress, RunIdentity, read_record
from train.checkpoint.remote import RemoteCheckpoints, fetch_checkpoint_url, holds_checkpoints
from train.checkpoint.resume import check_resumable, intact_resume, load_mode, remote_resume, resolve_resume
from train.checkpoint.safe_load import safe_load, scan_pickles
from train.checkpoint.save import CheckpointSaver, save_checkpoint
from train.checkpoint.universal import ensure_universal

__all__ = [
    "CHECKPOINTS",
    "COMPLETE",
    "DS_MODEL_STATES",
    "LATEST",
    "META",
    "TOKENIZER",
    "CheckpointDamaged",
    "CheckpointRecord",
    "CheckpointSaver",
    "RemoteCheckpoints",
    "Progress",
    "RunIdentity",
    "check_resumable",
    "checkpoints_dir",
    "checkpoints_location",
    "complete_checkpoints",
    "consolidate_checkpoint",
    "ensure_universal",
    "fetch_checkpoint_url",
    "holds_checkpoints",
    "find_checkpoint",
    "has_record",
    "intact_resume",
    "is_complete",
    "load_checkpoint",
    "load_mode",
    "load_module_weights",
    "looks_like_checkpoint",
    "prune_checkpoints",
    "read_latest",
    "read_record",
    "remote_resume",
    "record_files",
    "resolve_resume",
    "rng_file",
    "safe_load",
    "save_checkpoint",
    "scan_pickles",
    "step_of",
    "step_tag",
    "tokenizer_file",
    "verify_checkpoint",
]
