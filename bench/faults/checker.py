"""The invariants that must hold after a run, each printed with how many cases it
looked at and how many broke it. Any violation makes the run fail.

The ledger is read directly from PostgreSQL (past the proxy). Each transfer the workload
asked for carries its idempotency key in its metadata (`op`), so the rows a key made
can be counted: an acknowledged one exactly once, a refused one never, one whose answer
never came at most once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import sys
import time
from typing import Any, Final

import asyncpg

from bench.faults import trade_checks
from bench.faults.check import EXAMPLES_MAX, Check
from bench.faults.history import History, Op, Outcome
from bench.faults.nemesis import Nemesis

RECONCILE_TIMEOUT_S: Final = 120.0
# Refusals the workload can earn by itself; any other is a bug of the server or harness.
EXPECTED_REFUSALS: Final = {
    "transfer": {"insufficient_funds"},
    "hold": {"insufficient_funds"},
    # Only one request ever resolves a given hold, so it can only find it expired.
    "post": {"pending_transfer_expired"},
    "void": {"pending_transfer_expired"},
    # One client drives each trade, one legal step at a time: only money can be short,
    # the buyer's to pay, or the seller's to pay a refund back after settlement (the
    # merchants pay users out of what their trades settled, see workload.payout).
    "trade_pay": {"insufficient_funds"},
    "trade_refund": {"insufficient_funds"},
}
CREATING_KINDS: Final = ("transfer", "hold")


@dataclasses.dataclass
class Ledger:
    """What the database holds at the end, as the checks need it."""

    rows_by_op: dict[str, list[asyncpg.Record]]
    transfers_by_id: dict[str, asyncpg.Record]
    resolutions: dict[str, int]  # transfer id -> entries that resolved it (2 per resolution)


async def read_ledger(conn: asyncpg.Connection) -> Ledger:
    rows = await conn.fetch(
        """SELECT id::text AS id, metadata->>'op' AS op, debit_account_id::text AS debit,
                  credit_account_id::text AS credit, amount_minor, posted_amount_minor,
                  status, pending, metadata->>'trade_id' AS trade_id FROM transfers"""
    )
    by_op: dict[str, list[asyncpg.Record]] = collections.defaultdict(list)
    for row in rows:
        by_op[row["op"]].append(row)
    resolutions = await conn.fetch(
        """SELECT transfer_id::text AS id, count(*) AS n FROM entries
           WHERE kind IN ('post', 'void', 'expire') GROUP BY transfer_id"""
    )
    return Ledger(
        rows_by_op=dict(by_op),
        transfers_by_id={row["id"]: row for row in rows},
        resolutions={row["id"]: row["n"] for row in resolutions},
    )


def check_reads(history: History, *, total_minor: int) -> list[Check]:
    sums = Check("every snapshot of all balances sums to the starting total")
    negative = Check("no user or merchant balance negative in any snapshot")
    for snapshot in history.snapshots:
        sums.case(snapshot.total_minor == total_minor, f"sum {snapshot.total_minor}")
        negative.case(snapshot.negative == 0, f"{snapshot.negative} negative")
    http = Check("no user balance negative in any read over HTTP")
    for read in history.reads:
        bad = {
            account: (posted, read.available_minor[account])
            for account, posted in read.posted_minor.items()
            if posted < 0 or read.available_minor[account] < 0
        }
        http.case(not bad, str(bad))
    return [sums, negative, http]


def _matches(op: Op, row: asyncpg.Record) -> bool:
    body = op.body
    return (
        row["debit"] == body["debit_account_id"]
        and row["credit"] == body["credit_account_id"]
        and row["amount_minor"] == body["amount_minor"]
        and row["pending"] == body.get("pending", False)
        and (op.result is None or op.result["id"] == row["id"])
    )


def check_creations(history: History, ledger: Ledger, *, setup_ops: set[str]) -> list[Check]:
    acked = Check("every acknowledged transfer and hold is in the ledger exactly once")
    refused = Check("every refused transfer and hold is absent")
    unknown = Check("every transfer and hold never answered is there at most once")
    stray = Check("no transfer in the ledger that no client asked for")
    for op in history.ops.values():
        if op.kind not in CREATING_KINDS:
            continue
        rows = ledger.rows_by_op.get(op.key, [])
        if op.outcome is Outcome.OK:
            ok = len(rows) == 1 and _matches(op, rows[0])
            acked.case(ok, f"{op.key}: {len(rows)} rows {[dict(r) for r in rows]}")
        elif op.outcome is Outcome.FAILED:
            refused.case(not rows, f"{op.key} ({op.code}): {len(rows)} rows")
        else:
            unknown.case(len(rows) <= 1 and all(_matches(op, r) for r in rows), op.key)
    for key, rows in ledger.rows_by_op.items():
        if key is None:  # a trade's transfers carry its id instead (trade_checks.py)
            for row in rows:
                stray.case(row["trade_id"] is not None, f"{dict(row)}")
            continue
        stray.case(key in history.ops or key in setup_ops, f"{key}: {len(rows)} rows")
    return [acked, refused, unknown, stray]


def check_resolutions(history: History, ledger: Ledger) -> list[Check]:
    effect = Check("every acknowledged post or void took effect; every refused one none")
    once = Check("every hold resolves at most once")
    refusals = Check("every refusal is one the workload can earn")
    resolved_by: dict[str, list[Op]] = collections.defaultdict(list)
    for op in history.ops.values():
        if op.outcome is Outcome.FAILED:
            allowed = EXPECTED_REFUSALS.get(op.kind, set())
            refusals.case(op.code in allowed, f"{op.kind} {op.key}: {op.status} {op.code}")
        if op.kind not in ("post", "void") or op.hold_key is None:
            continue
        hold = history.ops[op.hold_key]
        row = ledger.transfers_by_id.get(hold.result["id"])
        if row is None:
            effect.case(False, f"{op.key}: hold {hold.result['id']} missing")
            continue
        if op.outcome is Outcome.OK:
            resolved_by[row["id"]].append(op)
            asked = op.body.get("amount_minor", row["amount_minor"]) if op.kind == "post" else 0
            want = "posted" if op.kind == "post" else "voided"
            ok = row["status"] == want and row["posted_amount_minor"] == asked
            effect.case(ok, f"{op.key}: hold is {row['status']}, {row['posted_amount_minor']}")
        elif op.outcome is Outcome.FAILED:
            effect.case(row["status"] == "expired", f"{op.key}: hold is {row['status']}")
    for transfer_id, row in ledger.transfers_by_id.items():
        if not row["pending"]:
            continue
        entries = ledger.resolutions.get(transfer_id, 0)
        acked = len(resolved_by.get(transfer_id, []))
        once.case(entries <= 2 and acked <= 1, f"hold {transfer_id}: {entries} entries")
    return [effect, once, refusals]


async def wait_for_holds(conn: asyncpg.Connection, *, timeout_s: float) -> int:
    """Wait until no hold is open (the sweeper expires the last ones); return how many
    are still open when timeout_s has passed. Before this, a hold past its timeout may
    still read 'pending' although every request on it is already refused as expired.
    A trade's hold has no timeout (the trade's days-long timers decide it): those of
    trades left paid stay open, and trade_checks.py checks them against their trades."""
    deadline = time.monotonic() + timeout_s
    while True:
        open_holds: int = await conn.fetchval(
            """SELECT count(*) FROM transfers
               WHERE status = 'pending' AND metadata->>'trade_id' IS NULL"""
        )
        if open_holds == 0 or time.monotonic() > deadline:
            return open_holds
        await asyncio.sleep(0.5)


async def check_ledger(conn: asyncpg.Connection, *, open_holds: int) -> list[Check]:
    entries = Check("every balance equals the sum of its entries")
    rows = await conn.fetch(
        """SELECT a.id, a.credits_posted - a.debits_posted AS posted,
                  coalesce(sum(e.posted_delta_minor), 0) AS from_entries,
                  a.credits_pending - a.debits_pending AS pending,
                  coalesce(sum(e.pending_delta_minor), 0) AS pending_from_entries
           FROM accounts a LEFT JOIN entries e ON e.account_id = a.id
           GROUP BY a.id"""
    )
    for row in rows:
        ok = row["posted"] == row["from_entries"] and row["pending"] == row["pending_from_entries"]
        entries.case(ok, str(dict(row)))
    pending = Check("pending totals are back to the open trade holds once every other hold is done")
    totals = await conn.fetchrow(
        """SELECT coalesce(sum(debits_pending), 0)::bigint AS debits,
                  coalesce(sum(credits_pending), 0)::bigint AS credits,
                  (SELECT coalesce(sum(amount_minor), 0)::bigint FROM transfers
                   WHERE status = 'pending' AND metadata->>'trade_id' IS NOT NULL) AS trades
           FROM accounts"""
    )
    assert totals is not None
    pending.case(
        open_holds == 0 and totals["debits"] == totals["credits"] == totals["trades"],
        f"{open_holds} holds open, pending {dict(totals)}",
    )
    return [entries, pending]


async def check_reconcile(dsn: str, env: dict[str, str]) -> Check:
    check = Check("`txengine reconcile` passes")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "reconcile",
        env={**env, "TXENGINE_DATABASE_URL": dsn},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), RECONCILE_TIMEOUT_S)
    check.case(process.returncode == 0, output.decode(errors="replace")[-2000:])
    return check


def check_recovery(history: History, nemesis: Nemesis, *, ready_at_end: bool) -> list[Check]:
    readiness = Check("readiness answered a prompt 503 `unavailable` while PostgreSQL was down")
    probes = nemesis.readiness
    for _ in range(probes.clear):
        readiness.case(True)
    for _ in range(probes.hung):
        readiness.case(False, "no answer in time: hung")
    for other in probes.other:
        readiness.case(False, other)
    back = Check("the gateway was ready again by itself after every fault")
    for fault in nemesis.faults:
        back.case(fault.recovered_s is not None, f"{fault.kind} at {fault.at_s} s")
    back.case(ready_at_end, "not ready at the end of the run")
    errors = Check("no answer was a 500 (an unhandled error)")
    errors.checked = sum(op.attempts for op in history.ops.values())
    errors.violations = len(history.server_errors)
    errors.examples = history.server_errors[:EXAMPLES_MAX]
    return [readiness, back, errors]


async def check_all(
    *,
    dsn: str,
    env: dict[str, str],
    history: History,
    nemesis: Nemesis,
    total_minor: int,
    setup_ops: set[str],
    holds_timeout_s: float,
    ready_at_end: bool,
) -> list[Check]:
    checks = check_reads(history, total_minor=total_minor)
    conn = await asyncpg.connect(dsn)
    try:
        open_holds = await wait_for_holds(conn, timeout_s=holds_timeout_s)
        ledger = await read_ledger(conn)
        checks += check_creations(history, ledger, setup_ops=setup_ops)
        checks += check_resolutions(history, ledger)
        checks += await trade_checks.check_trades(conn, history, ledger)
        checks += await check_ledger(conn, open_holds=open_holds)
    finally:
        await conn.close()
    checks.append(await check_reconcile(dsn, env))
    checks += check_recovery(history, nemesis, ready_at_end=ready_at_end)
    return checks


def render(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        mark = "ok  " if check.violations == 0 else "FAIL"
        lines.append(f"{mark} {check.name}: {check.checked} checked, {check.violations} violations")
        lines.extend(f"       {example}" for example in check.examples)
    return "\n".join(lines)


def summary(history: History) -> dict[str, Any]:
    return {kind: dict(counts) for kind, counts in sorted(history.by_kind().items())}
