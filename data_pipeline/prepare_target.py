"""Whether `slm prepare` may start writing into data.dir: only a folder that is empty or already ours.

A fresh prepare writes tokenizer.json and `<source>-<split>-NNNNN.bin` shards, and its restart logic cuts
and removes shard files by name. In a folder holding someone else's files that could overwrite or delete
them, so a fresh start requires data.dir to be absent, empty, or left by an earlier prepare (its
`.prepare` work folder or lock file present); the work folder is created at once to mark the folder ours.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.errors import DataError


def claim_fresh_data_dir(data_dir: Path, work_dir_name: str, lock_name: str) -> None:
    """DataError naming the foreign entries when data_dir holds files an earlier prepare did not write."""
    entries = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    ours = work_dir_name in entries
    foreign = [
        name
        for name in entries
        if name not in (work_dir_name, lock_name)
        and not (ours and name.endswith(".bin"))
        and not (ours and name == "tokenizer.json")
    ]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DataError(
            f"data.dir {data_dir} already holds files that `slm prepare` did not write ({shown}); prepare "
            "writes tokenizer.json and shard files there and could overwrite them. Choose an empty or new "
            "data.dir."
        )
    (data_dir / work_dir_name).mkdir(parents=True, exist_ok=True)
