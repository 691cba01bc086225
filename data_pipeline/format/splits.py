"""Which documents are held out for validation: a pure function of the document's index in its source.

Document i (0-based, in source order) is a validation document when floor((i+1)·f) > floor(i·f), with the
fraction f taken as an exact ratio: a fraction f of the documents, spread evenly through the source (with
f = 0.05, documents 19, 39, 59, ...). It needs no count of the documents in advance (sources stream), and
anyone can put the train and val documents back in corpus order from the index alone. A source with a
single document gives its tail instead (see `tail_split`).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def _ratio(val_fraction: float) -> Fraction:
    return Fraction(str(val_fraction)).limit_denominator(1_000_000)


def validation_mask(first_index: int, count: int, val_fraction: float) -> np.ndarray:
    """Boolean mask over documents first_index .. first_index+count-1: True for validation documents."""
    ratio = _ratio(val_fraction)
    index = np.arange(first_index, first_index + count, dtype=np.int64)
    num, den = ratio.numerator, ratio.denominator
    return ((index + 1) * num) // den > (index * num) // den


def tail_split(text: str, val_fraction: float) -> int:
    """Where a single-document corpus splits into train head and validation tail: the start of the line
    nearest below the last `val_fraction` of the characters (0 when there is nothing to hold out)."""
    if val_fraction <= 0 or len(text) < 2:
        return 0
    cut = int(len(text) * (1.0 - val_fraction))
    cut = min(max(cut, 1), len(text) - 1)
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start > len(text) // 2:
        cut = line_start
    return cut
