"""The fault matrix at 20 SIGKILL points (tests/integration/test_fault_matrix.py runs 5): prints the result as JSON.

    .venv/bin/python bench/fault_matrix.py [--points 20] [--steps 40] [--seed 7]

The last result is recorded in docs/guarantees.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.slm_runs import prepare_tiny_shakespeare  # noqa: E402
from tests.fault_matrix import run_matrix  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepare_tiny_shakespeare(Path(tmp) / "data")
        started = time.time()
        result = run_matrix(Path(tmp), data_dir, args.seed, args.points, args.steps)
        result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))
    ok = result["losses_equal"] and result["steps_once"] and result["params_equal"] and result["done"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
