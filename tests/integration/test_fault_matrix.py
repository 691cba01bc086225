"""SIGKILL at 5 seeded random points (one inside a save at least), each restart the same command: the loss curve
and the final parameters equal the uninterrupted run's bitwise, and metrics.jsonl has every step exactly once."""

from __future__ import annotations

import pytest

from tests.fault_matrix import kill_points, run_matrix

pytestmark = pytest.mark.slow

SEED, POINTS, STEPS = 20261201, 5, 12


def test_points_are_seeded_and_include_a_save():
    points = kill_points(SEED, POINTS, STEPS)
    assert points == kill_points(SEED, POINTS, STEPS) and len(points) == POINTS
    assert any(where == "save" for _, where in points)


def test_kill_9_at_random_points_resumes_bitwise(tiny_data_dir, tmp_path):
    """Slow (about 45 s on 2 busy cores): seven `slm train` start-ups, the 12-step reference and the same command
    killed at 5 points and restarted until it finishes; each kill is a separate process, the point of the test."""
    result = run_matrix(tmp_path, tiny_data_dir, SEED, POINTS, STEPS)
    assert result["losses_equal"] and result["steps_once"] and result["params_equal"] and result["done"], (
        result
    )
