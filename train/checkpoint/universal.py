"""DeepSpeed universal checkpoints: a step folder converted once (world size or ZeRO stage changed within 1-3)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from common.atomic import atomic_write_text
from common.log import say
from train.checkpoint.layout import COMPLETE, META, TMP_PREFIX, TOKENIZER, UNIVERSAL
from train.checkpoint.safe_load import scan_pickles
from train.errors import TrainError


def ensure_universal(step_dir: Path) -> Path:
    """A DeepSpeed universal checkpoint of `step_dir` (ZeRO 1-3), converted once into `step_dir/universal`.

    Written under a temporary name and renamed when complete, like every checkpoint; the conversion
    runs on rank 0 only (the caller shares the result).
    """
    out = step_dir / UNIVERSAL
    if (out / COMPLETE).is_file():
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # heavy: only when converting

    tmp = step_dir / f"{TMP_PREFIX}{UNIVERSAL}"
    scan_pickles(step_dir)  # ds_to_universal unpickles with weights_only=False
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(step_dir),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    say(f"converting {step_dir} to a DeepSpeed universal checkpoint (world size or ZeRO stage changed)")
    try:
        ds_to_universal(args)
    except Exception as err:  # DeepSpeed raises assertion/value/key errors from deep inside
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainError(
            f"Converting checkpoint '{step_dir}' to a universal checkpoint failed ({type(err).__name__}: "
            f"{err}); resume with the world size and ZeRO stage it was written with."
        ) from None
    for name in (META, TOKENIZER):
        shutil.copyfile(step_dir / name, tmp / name)
    atomic_write_text(tmp / COMPLETE, f"{UNIVERSAL}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
