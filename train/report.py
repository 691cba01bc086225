"""`slm report RUN_DIR`: plot a run's metrics.jsonl into RUN_DIR/report.png and print a summary.

A resumed run appends to the same metrics.jsonl, so a step can appear twice (logged before the
interruption, then again after resuming from an earlier checkpoint): the last occurrence of each
step wins, per kind of row (train or eval; downstream rows per task and step). Rows of other kinds are left out.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from train.errors import TrainError
from train.metrics import METRICS_FILE

REPORT_FILE = "report.png"


@dataclass
class RunMetrics:
    """A run's train and eval rows, one per step (last occurrence wins), sorted by step."""

    train: List[Dict[str, Any]] = field(default_factory=list)
    eval: List[Dict[str, Any]] = field(default_factory=list)
    first_of_segment: Set[int] = field(default_factory=set)
    """Train steps logged first after a (re)start; their throughput includes start-up, so means skip them."""
    downstream: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    """Downstream rows (eval.downstream) of each task, one per step, sorted by step."""
    centred: List[Dict[str, Any]] = field(default_factory=list)
    """downstream_score rows (the centred score over the evaluated tasks), one per step, sorted by step."""


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_metrics(run_dir: str | os.PathLike) -> RunMetrics:
    """Parse RUN_DIR/metrics.jsonl; TrainError naming the file (and line) if missing, empty or garbled."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise TrainError(
            f"No metrics file at '{path}': expected a run dir written by `slm train` (it holds metrics.jsonl)."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TrainError(f"Metrics file '{path}' could not be read: {err}.") from None
    train: Dict[int, Dict[str, Any]] = {}
    evals: Dict[int, Dict[str, Any]] = {}
    downstream: Dict[str, Dict[int, Dict[str, Any]]] = {}
    centred: Dict[int, Dict[str, Any]] = {}
    first_of_segment: Set[int] = set()
    last_train_step: Optional[int] = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TrainError(
                f"Metrics file '{path}' line {number} is not valid JSON ({err.msg}): {line[:80]!r}."
            ) from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("step"), int)
            or isinstance(row.get("step"), bool)
        ):
            raise TrainError(
                f"Metrics file '{path}' line {number} is not a metrics row: expected a JSON object with an integer 'step', got {line[:80]!r}."
            )
        step = row["step"]
        is_eval = row.get("kind") == "eval" or (row.get("kind") is None and "val_loss" in row)
        if is_eval:
            evals[step] = row
            continue
        if row.get("kind") == "downstream" and isinstance(row.get("task"), str):
            downstream.setdefault(row["task"], {})[step] = row
            continue
        if row.get("kind") == "downstream_score":
            centred[step] = row
            continue
        if row.get("kind") not in (None, "train"):
            continue
        if last_train_step is None or step <= last_train_step:
            first_of_segment.add(step)
        else:
            first_of_segment.discard(step)
        last_train_step = step
        train[step] = row
    if not train and not evals:
        raise TrainError(f"Metrics file '{path}' holds no metrics rows: the run has not logged a step yet.")
    return RunMetrics(
        train=[train[s] for s in sorted(train)],
        eval=[evals[s] for s in sorted(evals)],
        first_of_segment=first_of_segment,
        downstream={task: [rows[s] for s in sorted(rows)] for task, rows in sorted(downstream.items())},
        centred=[centred[s] for s in sorted(centred)],
    )


def _series(rows: List[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    steps, values = [], []
    for row in rows:
        value = _number(row.get(key))
        if value is not None:
            steps.append(row["step"])
            values.append(value)
    return steps, values


def _best(rows: List[Dict[str, Any]], key: str) -> Tuple[Optional[float], Optional[int]]:
    steps, values = _series(rows, key)
    if not values:
        return None, None
    index = min(range(len(values)), key=values.__getitem__)
    return values[index], steps[index]


def summarize(metrics: RunMetrics) -> Dict[str, Any]:
    """The numbers `slm report` prints: steps, tokens seen, best val loss/bpb (and steps), mean tokens/s, final loss,
    and each downstream task's latest acc/acc_norm."""
    all_steps = [row["step"] for row in metrics.train + metrics.eval]
    tokens_steps, tokens = _series(metrics.train, "tokens")
    best_loss, best_loss_step = _best(metrics.eval, "val_loss")
    best_bpb, best_bpb_step = _best(metrics.eval, "val_bpb")
    steady = [row for row in metrics.train if row["step"] not in metrics.first_of_segment]
    _, throughput = _series(steady or metrics.train, "tokens_per_second")
    _, losses = _series(metrics.train, "loss")
    return {
        "steps": max(all_steps),
        "tokens_seen": int(tokens[-1]) if tokens else None,
        "best_val_loss": best_loss,
        "best_val_loss_step": best_loss_step,
        "best_val_bpb": best_bpb,
        "best_val_bpb_step": best_bpb_step,
        "mean_tokens_per_second": sum(throughput) / len(throughput) if throughput else None,
        "final_train_loss": losses[-1] if losses else None,
        "downstream": {
            task: {key: rows[-1][key] for key in ("step", "acc", "acc_norm") if key in rows[-1]}
            for task, rows in metrics.downstream.items()
        },
        "centred_score": {key: metrics.centred[-1].get(key) for key in ("step", "centred_score", "tasks")}
        if metrics.centred
        else None,
        "val_per_source": {
            "step": metrics.eval[-1]["step"],
            **{key: value for key, value in metrics.eval[-1].items() if key.startswith("val/")},
        }
        if metrics.eval and any(key.startswith("val/") for key in metrics.eval[-1])
        else None,
    }


def format_summary(summary: Dict[str, Any]) -> str:
    def show(value: Optional[float], spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    def at(step: Optional[int]) -> str:
        return "" if step is None else f" (step {step})"

    rows = [
        ("steps", str(summary["steps"])),
        ("tokens seen", show(summary["tokens_seen"], ",d")),
        ("best val loss", show(summary["best_val_loss"], ".4f") + at(summary["best_val_loss_step"])),
        ("best val bits/byte", show(summary["best_val_bpb"], ".4f") + at(summary["best_val_bpb_step"])),
        ("mean tokens/s", show(summary["mean_tokens_per_second"], ",.0f")),
        ("final train loss", show(summary["final_train_loss"], ".4f")),
    ]
    for task, last in summary.get("downstream", {}).items():  # the latest downstream score of each task
        scores = ", ".join(
            f"{key} {show(last.get(key), '.4f')}" for key in ("acc", "acc_norm") if key in last
        )
        rows.append((f"downstream {task}", scores + at(last.get("step"))))
    centred = summary.get("centred_score")
    if centred:
        rows.append(
            (
                "centred score",
                show(centred["centred_score"], "+.4f") + f" over {centred['tasks']}" + at(centred["step"]),
            )
        )
    per_source = summary.get("val_per_source")
    if per_source:  # the last eval row's val/<source>/loss and bpb
        names = [key.split("/")[1] for key in per_source if key.endswith("/loss")]
        for name in names:
            value = f"loss {show(per_source.get(f'val/{name}/loss'), '.4f')}"
            if f"val/{name}/bpb" in per_source:
                value += f", bpb {show(per_source[f'val/{name}/bpb'], '.4f')}"
            rows.append((f"val {name}", value + at(per_source["step"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def draw_downstream(ax: Any, downstream: Dict[str, List[Dict[str, Any]]]) -> None:
    """One colour per task: acc_norm solid, acc dashed, against step."""
    for index, (task, rows) in enumerate(downstream.items()):
        color = f"C{index % 10}"
        for key, style in (("acc_norm", "-"), ("acc", "--")):
            steps, values = _series(rows, key)
            if values:
                ax.plot(
                    steps,
                    values,
                    style,
                    color=color,
                    marker="o" if len(values) < 30 else None,
                    markersize=3,
                    label=f"{task} {key}",
                )
    ax.legend(fontsize="small", ncol=2)
    ax.set_ylabel("accuracy")


def draw(metrics: RunMetrics, title: str = "") -> Any:
    """The report's matplotlib figure: loss (and per-source validation loss), lr, tokens/s, val bits/byte; data wait
    and MFU, and downstream accuracy, when logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pace = [
        (key, label)
        for key, label in (("data_wait", "data wait (share of step)"), ("mfu", "MFU"))
        if _series(metrics.train, key)[1]
    ]
    rows = 2 + bool(pace) + bool(metrics.downstream)
    fig = plt.figure(figsize=(12, 4 * rows), dpi=100)
    grid = fig.add_gridspec(rows, 2)
    val_sources = sorted(
        {key for row in metrics.eval for key in row if key.startswith("val/") and key.endswith("/loss")}
    )
    panels = (
        (
            fig.add_subplot(grid[0, 0]),
            "loss",
            (
                (metrics.train, "loss", "train loss"),
                (metrics.eval, "val_loss", "val loss"),
                *((metrics.eval, key, key) for key in val_sources),  # per-source validation, when logged
            ),
        ),
        (fig.add_subplot(grid[0, 1]), "learning rate", ((metrics.train, "lr", "lr"),)),
        (fig.add_subplot(grid[1, 0]), "tokens/s", ((metrics.train, "tokens_per_second", "tokens/s"),)),
        (fig.add_subplot(grid[1, 1]), "val bits per byte", ((metrics.eval, "val_bpb", "val bpb"),)),
        *(
            (fig.add_subplot(grid[2, column]), label, ((metrics.train, key, label),))
            for column, (key, label) in enumerate(pace)
        ),
    )
    for ax, name, curves in panels:
        drawn = False
        for series_rows, key, label in curves:
            steps, values = _series(series_rows, key)
            if values:
                ax.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3, label=label)
                drawn = True
        if not drawn:
            ax.text(
                0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes, color="gray"
            )
        elif len(curves) > 1:
            ax.legend()
    axes = [ax for ax, _, _ in panels]
    if metrics.downstream:
        axes.append(fig.add_subplot(grid[rows - 1, :]))
        draw_downstream(axes[-1], metrics.downstream)
    for ax, name in zip(axes, [name for _, name, _ in panels] + ["downstream accuracy"]):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(metrics: RunMetrics, out_path: str | os.PathLike, title: str = "") -> Path:
    """Draw the report's figure (`draw`) into a PNG, written atomically."""
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    fig = draw(metrics, title)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp.png", dir=out_path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path


def report(run_dir: str | os.PathLike) -> Dict[str, Any]:
    """Write RUN_DIR/report.png and print the summary table; returns the summary numbers."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    summary = summarize(metrics)
    png = plot(metrics, run_dir / REPORT_FILE, title=run_dir.resolve().name)
    print(f"run {run_dir}\n{format_summary(summary)}\nplot  {png}")
    return summary
