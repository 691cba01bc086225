"""The `profile` section (its component: train.profiler.Profiler)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass(frozen=True)
class ProfileConfig:
    """The `profile` section: which steps the torch profiler records."""

    steps: List[int] = field(default_factory=list)
    """[first, last] step (1-based, inclusive) to trace into run.dir/profile/; empty: off."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        if not self.steps:
            return
        if len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]:
            raise ValueError(
                f"config key 'profile.steps' is {list(self.steps)}; expected [first, last] with 1 <= first <= last "
                "(steps are 1-based, as logged), or [] for no profile."
            )
