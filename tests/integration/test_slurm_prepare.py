"""`slm slurm --prepare N`: the scripts it writes, and on a real one-node Slurm (tests/integration/slurm_localhost.sh)
a tokenizer job, a job array of parts and a dependent merge job whose result equals a single prepare."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from data_pipeline.prepare.dispatch import prepare
from launch.config import load_config
from tests.helpers import SHAKESPEARE, TINY, run, slm_cmd
from tests.integration.test_slurm_cluster import FINAL_STATES, job_info, slurm_cluster  # noqa: F401 - fixture

CORPUS = Path(SHAKESPEARE).read_text(encoding="utf-8")


def corpus(root: Path) -> Path:
    folder = root / "corpus"
    folder.mkdir()
    lines = [line for line in CORPUS[:200_000].splitlines() if line.strip()]
    for i in range(4):
        (folder / f"{i}.txt").write_text("\n".join(lines[i::4]) + "\n", encoding="utf-8")
    return folder


def overrides(data_dir: Path, folder: Path):
    return [
        f"data.dir={data_dir}",
        "data.num_proc=1",
        "data.shard_tokens=5000",
        "tokenizer.vocab_size=400",
        f"data.sources=[{{path: {folder}, doc_boundary: line}}]",
    ]


def test_scripts_chain_tokenizer_array_and_merge(tmp_path):
    out = run(
        slm_cmd(["slurm", TINY, "--prepare", "3", "--partition", "cpu", *overrides(tmp_path / "d", tmp_path)])
    ).stdout
    parts = (tmp_path / "d" / ".slurm" / "parts.sbatch").read_text()
    assert "#SBATCH --array=1-3" in parts and "#SBATCH --partition=cpu" in parts
    assert '--part "$SLURM_ARRAY_TASK_ID/3"' in parts
    assert "--tokenizer-only" in (tmp_path / "d" / ".slurm" / "tokenizer.sbatch").read_text()
    assert "--merge" in (tmp_path / "d" / ".slurm" / "merge.sbatch").read_text()
    assert "# merge:" in out


@pytest.mark.slow
def test_prepare_as_slurm_jobs_equals_a_single_prepare(slurm_cluster, tmp_path):  # noqa: F811
    """Slow (about 45 s on 2 busy cores): four real Slurm jobs (the tokenizer, a job array of two parts, the merge
    that waits for them), each a fresh Python start-up, then a single prepare in the test process to compare
    with, byte for byte."""
    folder = corpus(tmp_path)
    data_dir = tmp_path / "slurm_data"
    out = run(
        slm_cmd(["slurm", TINY, "--prepare", "2", "--submit", *overrides(data_dir, folder)]), timeout=60
    ).stdout
    ids = re.findall(r"^submitted job (\d+) \((\w+)\)", out, flags=re.M)
    assert [step for _, step in ids] == ["tokenizer", "parts", "merge"]
    merge_id = ids[-1][0]
    deadline = time.monotonic() + 600
    try:
        while job_info(merge_id).get("JobState") not in FINAL_STATES:
            assert time.monotonic() < deadline, f"merge job did not end: {job_info(merge_id)}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", *[i for i, _ in ids]], capture_output=True)
    logs = "\n".join(
        p.read_text(errors="replace")[-3000:] for p in sorted((data_dir / ".slurm").glob("*.out"))
    )
    assert job_info(merge_id).get("JobState") in ("COMPLETED", ""), logs
    assert "part 1/2 wrote" in logs and "part 2/2 wrote" in logs and "merged 2 parts" in logs
    single = tmp_path / "single"
    cfg = load_config(TINY, overrides(single, folder))
    prepare(cfg.data, cfg.tokenizer)
    names = sorted(p.name for p in single.iterdir() if p.is_file() and not p.name.startswith("."))
    assert names == sorted(p.name for p in data_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    assert all((single / n).read_bytes() == (data_dir / n).read_bytes() for n in names)
