"""Where the trainer's metric rows go: console, `run.dir/metrics.jsonl` and wandb, on rank 0 only.

metrics.jsonl holds one JSON object per line, appended and flushed row by row, so a crash loses no
logged row and a resumed run appends to the same file (`slm report` keeps the last row of each
step). The trainer passes plain dicts; the names this module and `slm report` understand are:

- train rows: step, loss, lr, tokens (seen so far), grad_norm, tokens_per_second, mfu (a
  fraction), step_ms, data_wait (the fraction of step time spent waiting for batches), skipped_steps,
  peak_memory_gib (rank 0's peak since the last row: torch's allocations on a GPU, the process's RSS on a CPU),
  max_steps (the step the run ends at), elapsed_s (seconds since this invocation started), eta_s (seconds
  to max_steps at this invocation's pace, capped by the time budget), time_left_s (with train.max_time);
- eval rows: step, val_loss, val_ppl, val_bpb;
- downstream rows (kind "downstream", one per task and step): step, tokens, task, acc, acc_norm (and their
  stderr), examples, chance, centred; LAMBADA's also perplexity. wandb gets them as downstream/<task>/<metric>;
- downstream_score rows (one per evaluation): step, tokens, centred_score, tasks; wandb downstream_score/centred_score.

The logger adds `time` (unix seconds) and `kind` ("eval" when a key starts with "val_", else
"train") unless the row has them. Tensors and numpy scalars become Python numbers; non-finite
floats are written as null (strict JSON), the console shows them as nan.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, TextIO

from common.atomic import atomic_write_text
from common.json_fields import field_problem
from train.errors import TrainError

if TYPE_CHECKING:
    from train.config import Config

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"


def _plain(value: Any) -> Any:
    """A JSON-ready Python value: tensors/numpy scalars unwrapped, non-finite floats as None."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt_count(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """A short duration for a console line: 42s, 5m03s, 2h07m, 3d04h."""
    seconds = max(int(round(seconds)), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


_DURATIONS = ("elapsed_s", "eta_s", "time_left_s")


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key == "lr":
        return f"{value:.2e}"
    if key in ("mfu", "data_wait"):
        return f"{100 * value:.1f}%"
    if key in ("tokens", "tokens_per_second"):
        return _fmt_count(value)
    if key == "step_ms":
        return f"{value:.0f}"
    if key == "peak_memory_gib":
        return f"{value:.2f}G"
    if key in _DURATIONS:
        return format_duration(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e3 else f"{value:.4g}"


# Console labels, in print order; other keys of the row follow as key=value.
_CONSOLE_KEYS = (
    ("loss", "loss"),
    ("val_loss", "val_loss"),
    ("val_ppl", "val_ppl"),
    ("val_bpb", "val_bpb"),
    ("lr", "lr"),
    ("grad_norm", "gnorm"),
    ("tokens_per_second", "tok/s"),
    ("tokens", "tokens"),
    ("mfu", "mfu"),
    ("step_ms", "step_ms"),
    ("data_wait", "data"),
    ("peak_memory_gib", "mem"),
    ("elapsed_s", "elapsed"),
    ("eta_s", "eta"),
    ("time_left_s", "time left"),
)
_NOT_PRINTED = {"step", "time", "kind", "max_steps"}


def format_row(row: Dict[str, Any]) -> str:
    """One compact console line with only the keys the row has, e.g. `train step 100 of 600 (16.7%) | loss 2.3456`."""
    where = str(row["step"]) if "step" in row else ""
    if where and isinstance(row.get("max_steps"), int) and row["max_steps"] > 0:
        where += f" of {row['max_steps']} ({100 * row['step'] / row['max_steps']:.1f}%)"
    parts = [f"{row.get('kind', 'train')} step {where}" if where else str(row.get("kind", "train"))]
    known = {key for key, _ in _CONSOLE_KEYS} | _NOT_PRINTED
    parts += [f"{label} {_fmt(key, row[key])}" for key, label in _CONSOLE_KEYS if key in row]
    parts += [f"{key} {_fmt(key, value)}" for key, value in row.items() if key not in known]
    return " | ".join(parts)


def rewind_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drop metrics rows logged after `step` by an earlier attempt, so a resumed run's rows follow on exactly."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a torn last line
            raise TrainError(
                f"Metrics file '{path}' line {number} is not valid JSON: {line[:80]!r}; a resume keeps every row up "
                "to its checkpoint and will not drop this one. Fix or remove the line."
            ) from None
        problem = field_problem(row, {"step": int}, required=("step",))
        if problem:
            raise TrainError(
                f"Metrics file '{path}' line {number} is not a metrics row ({problem}); a resume keeps every row "
                "up to its checkpoint and will not drop this one. Fix or remove the line."
            )
        if row["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


HISTORY = "history"
"""run.dir/history/<UTC time>/: the records of an earlier run set aside by a fresh start in the same run.dir."""
RUN_RECORDS = (METRICS_FILE, "config.yaml", "plan.json", "environment.json")
"""The files of a run.dir that describe one run's history (a fresh start would replace them)."""


def set_aside_history(run_dir: str | os.PathLike) -> Optional[Path]:
    """A fresh start in a run.dir whose metrics.jsonl holds rows (its checkpoints gone or none complete): move
    the earlier run's records into run.dir/history/<time>/ rather than truncate them. The folder, or None."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file() or not metrics.read_text(encoding="utf-8", errors="replace").strip():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (run_dir / HISTORY).mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=run_dir / HISTORY))  # never an existing folder
    for name in RUN_RECORDS:
        if (run_dir / name).is_file():
            os.replace(run_dir / name, folder / name)
    return folder


def _open_for_append(path: Path) -> TextIO:
    """Open metrics.jsonl for appending; drop a torn last line (a crash mid-write) so the file stays valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


class MetricsLogger:
    """Writes each metric row to metrics.jsonl, the console and wandb; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | os.PathLike, cfg: Config, rank: int, stream: Optional[TextIO] = None):
        self.run_dir = Path(run_dir)
        self.active = rank == 0
        self.console = bool(cfg.log.console)
        self.stream = stream
        self._file: Optional[TextIO] = None
        self._wandb_run: Any = None
        if not self.active:
            return
        self._file = _open_for_append(self.run_dir / METRICS_FILE)
        if cfg.log.wandb.mode != "disabled":
            try:
                self._wandb_run = self._start_wandb(cfg)
            except BaseException:
                self.close()
                raise

    def _start_wandb(self, cfg: Config) -> Any:
        """Start (or, on resume, continue under the id saved in run_dir/wandb_id.txt) the wandb run."""
        import wandb

        from train.config import to_dict

        wcfg = cfg.log.wandb
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)  # wandb ids: letters, digits, '-', '_'
            atomic_write_text(id_file, run_id + "\n")
        name = wcfg.name or self.run_dir.resolve().name
        try:
            return wandb.init(
                project=wcfg.project,
                name=name,
                tags=list(wcfg.tags),
                mode=wcfg.mode,
                dir=str(self.run_dir),
                config=to_dict(cfg),
                id=run_id,
                resume="allow",
            )
        except (
            Exception
        ) as err:  # wandb raises many types (UsageError, CommError, ...); all mean "not started"
            message = " ".join(str(err).split())
            raise TrainError(
                f"wandb could not start (log.wandb.mode={wcfg.mode}, project={wcfg.project!r}, id {run_id} from "
                f"{id_file}): {message}. Run `wandb login`, or set log.wandb.mode=offline or disabled."
            ) from None

    def log(self, row: Dict[str, Any]) -> None:
        """Record one row (train or eval); adds `time` and `kind` when absent."""
        if not self.active:
            return
        row = {key: _plain(value) for key, value in row.items()}
        row.setdefault("time", time.time())
        row.setdefault("kind", "eval" if any(key.startswith("val_") for key in row) else "train")
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} was closed; log() after close() is a bug.")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.console:
            print(format_row(row), file=self.stream or sys.stdout, flush=True)
        if self._wandb_run is not None:
            values = {
                key: value
                for key, value in row.items()
                if key not in _NOT_PRINTED and isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            if isinstance(
                row.get("task"), str
            ):  # per-task rows (downstream): one wandb key per task and metric
                values = {
                    f"{row['kind']}/{row['task']}/{key}": value
                    for key, value in values.items()
                    if key != "tokens"
                }
            elif row["kind"] not in ("train", "eval"):  # other kinds (downstream_score) under their own name
                values = {f"{row['kind']}/{key}": value for key, value in values.items() if key != "tokens"}
            step = row.get("step")
            self._wandb_run.log(values, step=int(step) if step is not None else None)

    def close(self) -> None:
        """Close metrics.jsonl and finish the wandb run (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
