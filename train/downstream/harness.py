"""lm-evaluation-harness task configs that point the harness's own tasks at our local task data.

Used by the agreement test and bench/eval_speed.py (and by anyone who wants to check a number with the harness
offline): for each task, the rows we would read are written as parquet (after `Task.normalize`, which only
casts a local copy's fields to the hub schema), and a YAML that `include`s the harness's installed task config
overrides only where the data comes from. lm_eval is imported lazily: it is a dev dependency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

from train.downstream.data import load_task_split
from train.downstream.tasks import get_task

HARNESS_PREFIX = "slm_"
"""Prefix of the generated task names (they must not clash with the harness's own)."""


def write_harness_tasks(
    task_names: Sequence[str], data_dir: Optional[str], out_dir: str | Path
) -> Dict[str, str]:
    """Write parquet data and task YAMLs into out_dir; returns our task name -> the harness task name to run."""
    import datasets
    import lm_eval

    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for name in task_names:
        task = get_task(name)
        data = load_task_split(task, data_dir, quiet=True)
        docs = [task.normalize(doc) if task.normalize else doc for doc in data.docs]
        parquet = out_dir / f"{task.name}.parquet"
        datasets.Dataset.from_list(docs).to_parquet(str(parquet))
        split_key = "test_split" if task.eval_split == "test" else "validation_split"
        other = "validation_split" if split_key == "test_split" else "test_split"
        harness_name = HARNESS_PREFIX + task.name
        (out_dir / f"{harness_name}.yaml").write_text(
            f"include: {tasks_root / task.harness_task}\n"
            f"task: {harness_name}\n"
            "tag: []\n"
            "dataset_path: parquet\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {data.split}: {parquet}\n"
            "training_split: null\n"
            f"{other}: null\n"
            f"{split_key}: {data.split}\n"
        )
        names[task.name] = harness_name
    return names
