"""train.evaluate: the bits-per-byte arithmetic."""

from __future__ import annotations

import math

import pytest

from train.evaluate import bits_per_byte


def test_bits_per_byte():
    assert bits_per_byte(math.log(2) * 3.0, 1.5) == pytest.approx(2.0)
    assert bits_per_byte(2.0, None) is None and bits_per_byte(float("nan"), 3.0) is None
