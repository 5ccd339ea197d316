"""What every client meant to do and what it was told, keyed by idempotency key.

A client writes its operation here *before* sending it, as a partner that must survive
its own crash would, and its outcome once an answer is definite. An operation whose
answer never became definite before the run ended stays UNKNOWN: the checker allows it
to have happened at most once.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from typing import Any


class Outcome(enum.StrEnum):
    PENDING = "pending"  # sent, no definite answer yet (the client is still retrying)
    OK = "ok"  # acknowledged: the effect happened and must be in the ledger exactly once
    FAILED = "failed"  # a definite refusal: the effect must be absent
    UNKNOWN = "unknown"  # the run ended first: the effect happened at most once


@dataclasses.dataclass(slots=True)
class Op:
    key: str  # the Idempotency-Key, also stored in the transfer's metadata as "op"
    kind: str  # "transfer", "hold", "post", "void", "trade", "trade_pay", ... (workload.py)
    method: str
    path: str
    body: dict[str, Any]
    hold_key: str | None = None  # post and void: the key of the hold they resolve
    trade_key: str | None = None  # a step of a trade: the key that created the trade
    outcome: Outcome = Outcome.PENDING
    status: int = 0
    code: str | None = None  # the problem code of a refusal
    result: Any = None  # the JSON of the acknowledged answer
    attempts: int = 0
    sent_at: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(slots=True)
class Read:
    """One read of balances over HTTP: what each account showed."""

    posted_minor: dict[str, int]
    available_minor: dict[str, int]


@dataclasses.dataclass(slots=True)
class Snapshot:
    """One read of every user balance in a single statement (one snapshot)."""

    total_minor: int
    negative: int  # user accounts whose posted or available balance was below zero


@dataclasses.dataclass
class History:
    ops: dict[str, Op] = dataclasses.field(default_factory=dict)
    reads: list[Read] = dataclasses.field(default_factory=list)
    snapshots: list[Snapshot] = dataclasses.field(default_factory=list)
    snapshot_failures: int = 0  # reads that could not reach the database (it was down)
    read_failures: int = 0  # HTTP reads that got no 200 (server or database down)
    server_errors: list[str] = dataclasses.field(default_factory=list)  # 500 answers: bugs

    def begin(self, op: Op) -> Op:
        assert op.key not in self.ops, f"key {op.key} used twice"
        self.ops[op.key] = op
        return op

    def by_kind(self) -> dict[str, collections.Counter[Outcome]]:
        counts: dict[str, collections.Counter[Outcome]] = collections.defaultdict(
            collections.Counter
        )
        for op in self.ops.values():
            counts[op.kind][op.outcome] += 1
        return dict(counts)
