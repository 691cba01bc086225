"""Whether `slm export` may write to OUT_DIR: it never deletes anything it did not write itself.

Every export writes a marker, `EXPORT_MARKER`, listing the files it wrote. OUT_DIR may be
  - absent or an empty folder: written;
  - a previous export (its marker present, no file the marker does not list): replaced, with `force` only;
  - anything else (a user's folder, a file, a run dir, a checkpoint, SRC itself, a folder holding SRC): refused.
A folder inside a run dir or a checkpoint is refused too, except under the run's own `exports/` folder
(where `export.every` writes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from train.checkpoint import CHECKPOINTS, looks_like_checkpoint
from train.errors import TrainError

EXPORT_MARKER = "slm_export.json"
"""Written into every export: who wrote it and which files it holds."""
RUN_DIR_EXPORTS = "exports"
"""The sub-folder of a run dir where exports may live."""


def looks_like_run_dir(path: Path) -> bool:
    return (path / CHECKPOINTS).is_dir() or (
        (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file()
    )


def marker_files(folder: Path) -> Optional[List[str]]:
    """The files a previous export wrote into `folder` (None when it is not an export of ours)."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(marker, dict)
        or marker.get("written_by") != "slm-forge"
        or not isinstance(marker.get("files"), list)
    ):
        return None
    return [str(name) for name in marker["files"]]


def write_marker(folder: Path, provenance: Dict[str, object]) -> None:
    """Record (last, inside the temporary folder) every file of the export."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    payload = {
        "written_by": "slm-forge",
        "files": files + [EXPORT_MARKER],
        "provenance": {key: str(value) for key, value in provenance.items()},
    }
    (folder / EXPORT_MARKER).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _in_run_exports(out: Path, run: Path) -> bool:
    inside = out.relative_to(run).parts
    return looks_like_run_dir(run) and len(inside) > 1 and inside[0] == RUN_DIR_EXPORTS


def _enclosing_conflict(out: Path) -> Optional[str]:
    """A run dir or checkpoint that is OUT_DIR or holds it (OUT_DIR under RUN/exports/ is allowed)."""
    for folder in [out, *out.parents]:
        if not folder.is_dir():
            continue
        if looks_like_checkpoint(folder):
            return f"it is or lies inside the checkpoint {folder}"
        if looks_like_run_dir(folder):
            if _in_run_exports(out, folder):
                return None
            return f"it is or lies inside the run dir {folder} (exports of a run belong in {folder / RUN_DIR_EXPORTS}/NAME)"
    return None


def _check_writable_parent(out: Path, out_dir: str | os.PathLike) -> None:
    """The export is built beside OUT_DIR and renamed into place: its nearest existing parent must be a
    writable folder (checked before the weights are loaded, not after)."""
    parent = out.parent
    while not os.path.lexists(parent) and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TrainError(
            f"Cannot export to {out_dir}: {parent} is a file, not a folder. Give a path whose parents are folders."
        )
    if not os.access(parent, os.W_OK):
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        raise TrainError(
            f"Cannot export to {out_dir}: {parent} is not writable "
            f"({'a read-only file system' if read_only else 'permission denied'}); the export is written beside "
            f"OUT_DIR and renamed into place. Choose a folder you can write to."
        )


def check_export_target(out_dir: str | os.PathLike, src: str | os.PathLike, force: bool = False) -> None:
    """TrainError naming the conflict when exporting SRC to OUT_DIR could delete something we did not write."""
    out, source = Path(os.path.abspath(out_dir)), Path(os.path.abspath(src))
    out_real, source_real = Path(os.path.realpath(out)), Path(os.path.realpath(source))
    advice = "Choose a new or empty OUT_DIR."
    if out_real == source_real or source_real.is_relative_to(out_real):
        raise TrainError(
            f"Refusing to export to {out_dir}: it is or holds the source {src}, which the export would "
            f"replace. {advice}"
        )
    if out_real.is_relative_to(source_real) and not _in_run_exports(out_real, source_real):
        raise TrainError(f"Refusing to export to {out_dir}: it lies inside the source {src}. {advice}")
    if out_real == Path.cwd().resolve() or out_real.parent == out_real:
        raise TrainError(
            f"Refusing to export to {out_dir}: it is the current folder (or the root), which an export cannot "
            f"replace by a rename. Give the path of a new folder, e.g. {Path(out_dir) / 'export'}."
        )
    _check_writable_parent(out, out_dir)
    conflict = _enclosing_conflict(out_real)
    if conflict:
        raise TrainError(
            f"Refusing to export to {out_dir}: {conflict}; replacing it would delete training state. {advice}"
        )
    if not os.path.lexists(out):
        return
    if not out.is_dir() or out.is_symlink():
        raise TrainError(f"Refusing to export to {out_dir}: it exists and is not a folder. {advice}")
    # Links count as files (a link to a folder too): rmtree would remove a link the user added.
    present = sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_symlink() or not p.is_dir()
    )
    if not present and not any(out.iterdir()):
        return
    ours = marker_files(out)
    if ours is None:
        shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
        raise TrainError(
            f"Refusing to export to {out_dir}: it already holds files that are not an slm export "
            f"({shown or 'sub-folders'}), and an export replaces its folder. {advice}"
        )
    foreign = sorted(set(present) - set(ours))
    if foreign:
        raise TrainError(
            f"Refusing to replace the export {out_dir}: it also holds {', '.join(foreign[:5])}, which the "
            f"export did not write. Move them away or choose another OUT_DIR."
        )
    if not force:
        raise TrainError(
            f"{out_dir} already holds an export; pass --force to replace it, or choose another OUT_DIR."
        )
