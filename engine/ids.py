"""Time-ordered 63-bit ids minted in process, so a batch knows its rows' ids before it
writes them and no round trip is spent on a sequence.

Layout (most significant first): 41 bits of milliseconds since 2025-01-01 UTC (good for
69 years), 10 bits of node, 12 bits of sequence. The node is drawn from a database
sequence at start, so processes running at the same time never share one; ids sort by
creation time, which time-partitioned tables can use later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

EPOCH_MS: Final = 1_735_689_600_000  # 2025-01-01T00:00:00Z
NODE_BITS: Final = 10
SEQUENCE_BITS: Final = 12
NODE_COUNT_MAX: Final = 1 << NODE_BITS
SEQUENCE_MAX: Final = (1 << SEQUENCE_BITS) - 1


class IdGenerator:
    def __init__(self, *, node: int, clock_ms: Callable[[], int] | None = None) -> None:
        assert 0 <= node < NODE_COUNT_MAX, node
        self._node = node
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._last_ms = 0
        self._sequence = 0

    def __call__(self) -> int:
        now_ms = self._clock_ms() - EPOCH_MS
        if now_ms > self._last_ms:
            self._last_ms = now_ms
            self._sequence = 0
        elif self._sequence < SEQUENCE_MAX:
            self._sequence += 1
        else:
            # More than 4,096 ids in one millisecond, or the wall clock stepped back: borrow
            # from the next millisecond rather than wait, so ids stay unique and increasing.
            self._last_ms += 1
            self._sequence = 0
        assert self._last_ms < (1 << 41), "id space exhausted"
        return (
            (self._last_ms << (NODE_BITS + SEQUENCE_BITS))
            | (self._node << SEQUENCE_BITS)
            | self._sequence
        )
