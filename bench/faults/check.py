"""One invariant of the checker: how many cases it looked at, how many broke it, and
the first few that did."""

from __future__ import annotations

import dataclasses
from typing import Final

EXAMPLES_MAX: Final = 5


@dataclasses.dataclass
class Check:
    name: str
    checked: int = 0
    violations: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def case(self, ok: bool, example: str = "") -> None:
        self.checked += 1
        if not ok:
            self.violations += 1
            if len(self.examples) < EXAMPLES_MAX:
                self.examples.append(example)
