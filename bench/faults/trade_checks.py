"""The checker's invariants for escrow trades (README "Escrow trades").

A trade's money moves by transfers that carry the trade's id in their metadata
(`trade_id`), not an `op` key: its holds (buyer → seller, pending, no timeout), the
posting of a hold to the seller when it is confirmed, the seller's payments back after
settlement, and the merchant fee if the operator set one. So the checks read the trades
and their refunds from the database and hold each against two things:

- the history: a trade a client was told exists is there once with its terms, one it was
  refused is not, and its state is what its last acknowledged step answered;
- the ledger: what the trade's transfers moved matches its state (unpaid or closed
  unpaid: nothing; paid, not yet confirmed: exactly its held amount on hold and nothing
  posted; settled: amount − refunds to the seller, less the net fee; fully refunded:
  nothing), and no hold of a trade is open twice or resolved twice.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from bench.faults.check import Check
from bench.faults.history import History, Op, Outcome
from bench.faults.workload import out_no

if TYPE_CHECKING:
    from bench.faults.checker import Ledger

UNPAID: Final = frozenset({"WAIT_BUYER_PAY"})
HELD: Final = frozenset({"WAIT_SELLER_SEND_GOODS", "WAIT_BUYER_CONFIRM_GOODS"})
SETTLED: Final = frozenset({"TRADE_SUCCESS", "TRADE_FINISHED"})
# What the checks compare between a step's answer and the trade's row.
COMPARED: Final = ("state", "held_minor", "settled_minor", "refunded_minor")

TRADES_SQL: Final = """
SELECT id::text AS id, out_trade_no, seller_account_id::text AS seller,
       buyer_account_id::text AS buyer, amount_minor, state, held_minor, settled_minor,
       refunded_minor, fee_minor, fee_refunded_minor, close_reason,
       hold_transfer_id::text AS hold_transfer_id
FROM trades"""
REFUNDS_SQL: Final = """
SELECT trade_id::text AS trade_id, out_request_no, amount_minor FROM trade_refunds"""
# What each trade's transfers did to each account: posted and pending, credit-normal.
EFFECTS_SQL: Final = """
SELECT t.metadata->>'trade_id' AS trade_id, e.account_id::text AS account,
       sum(e.posted_delta_minor)::bigint AS posted, sum(e.pending_delta_minor)::bigint AS pending
FROM entries e JOIN transfers t ON t.id = e.transfer_id
WHERE t.metadata->>'trade_id' IS NOT NULL
GROUP BY 1, 2"""


async def check_trades(conn: asyncpg.Connection, history: History, ledger: Ledger) -> list[Check]:
    trades = {row["id"]: row for row in await conn.fetch(TRADES_SQL)}
    refunds: dict[str, list[asyncpg.Record]] = collections.defaultdict(list)
    for row in await conn.fetch(REFUNDS_SQL):
        refunds[row["trade_id"]].append(row)
    effects: dict[tuple[str, str], tuple[int, int]] = {
        (row["trade_id"], row["account"]): (row["posted"], row["pending"])
        for row in await conn.fetch(EFFECTS_SQL)
    }
    steps: dict[str, list[Op]] = collections.defaultdict(list)
    for op in history.ops.values():
        if op.trade_key is not None:
            steps[op.trade_key].append(op)
    created = [op for op in history.ops.values() if op.kind == "trade"]
    checks = [
        check_created(created, trades),
        check_states(created, trades, steps),
        check_refunds(created, trades, refunds, steps),
        check_effects(trades, refunds, effects),
        check_holds(trades, ledger),
    ]
    return checks


def check_created(created: list[Op], trades: dict[str, asyncpg.Record]) -> Check:
    check = Check(
        "every acknowledged trade is there once with its terms; refused and stray ones absent"
    )
    by_no = {row["out_trade_no"]: row for row in trades.values()}
    asked = set()
    for op in created:
        asked.add(out_no(op.key))
        row = by_no.get(out_no(op.key))
        if op.outcome is Outcome.FAILED:
            check.case(row is None, f"{op.key} ({op.code}) is there")
            continue
        if row is None:
            check.case(op.outcome is not Outcome.OK, f"{op.key} acknowledged, missing")
            continue
        body = op.body
        ok = (
            row["seller"] == body["seller_account_id"]
            and row["buyer"] == body["buyer_account_id"]
            and row["amount_minor"] == body["amount_minor"]
            and (op.result is None or op.result["id"] == row["id"])
        )
        check.case(ok, f"{op.key}: {dict(row)}")
    for no, row in by_no.items():
        check.case(no in asked, f"trade {row['id']} ({no}) that no client asked for")
    return check


def check_states(
    created: list[Op], trades: dict[str, asyncpg.Record], steps: dict[str, list[Op]]
) -> Check:
    """One client drives a trade and no timer of a trade is due within a run (days), so
    its row shows what its last acknowledged step answered; a refused step changed
    nothing. A step never answered leaves the state open: it may or may not have run."""
    check = Check("every trade is in the state its last acknowledged step answered")
    for op in created:
        if op.outcome is not Outcome.OK:
            continue
        row = trades.get(op.result["id"])
        if row is None:
            continue  # counted by check_created
        ops = sorted(steps.get(op.key, []), key=lambda o: o.sent_at)
        answered = [o for o in ops if o.outcome is Outcome.OK]
        if any(o.outcome is Outcome.UNKNOWN for o in ops):
            continue
        last = answered[-1].result if answered else op.result
        if "trade" in last:  # a refund answers the refund and the trade after it
            last = last["trade"]
        ok = all(row[name] == last[name] for name in COMPARED)
        check.case(ok, f"{op.key}: row {[row[n] for n in COMPARED]}, told {last}")
    return check


def check_refunds(
    created: list[Op],
    trades: dict[str, asyncpg.Record],
    refunds: dict[str, list[asyncpg.Record]],
    steps: dict[str, list[Op]],
) -> Check:
    check = Check(
        "every acknowledged trade refund is there once, a refused one absent; they add up"
    )
    for op in created:
        if op.outcome is not Outcome.OK:
            continue
        trade_id = op.result["id"]
        made = refunds.get(trade_id, [])
        for step in steps.get(op.key, []):
            if step.kind != "trade_refund":
                continue
            found = [r for r in made if r["out_request_no"] == step.body["out_request_no"]]
            if step.outcome is Outcome.OK:
                ok = len(found) == 1 and found[0]["amount_minor"] == step.body["amount_minor"]
            elif step.outcome is Outcome.FAILED:
                ok = not found
            else:
                ok = len(found) <= 1
            check.case(ok, f"{step.key} ({step.outcome}): {len(found)} refunds")
    for trade_id, row in trades.items():
        total = sum(r["amount_minor"] for r in refunds.get(trade_id, []))
        check.case(total == row["refunded_minor"], f"trade {trade_id}: refunds {total}")
    return check


def expected_effect(row: asyncpg.Record) -> tuple[int, int, int] | None:
    """(buyer posted, seller posted, held) the trade's transfers must add up to, or None
    for a trade that must have no transfer at all."""
    state, amount, refunded = row["state"], row["amount_minor"], row["refunded_minor"]
    if state in UNPAID or (state == "TRADE_CLOSED" and row["close_reason"] != "fully_refunded"):
        return None
    net_fee = row["fee_minor"] - row["fee_refunded_minor"]
    if state in HELD:
        return 0, 0, amount - refunded
    if state in SETTLED:
        return -(amount - refunded), amount - refunded - net_fee, 0
    assert state == "TRADE_CLOSED", row  # fully refunded
    return 0, -net_fee, 0


def check_effects(
    trades: dict[str, asyncpg.Record],
    refunds: dict[str, list[asyncpg.Record]],
    effects: dict[tuple[str, str], tuple[int, int]],
) -> Check:
    check = Check("every trade's ledger effect matches its state")
    touched = collections.Counter(trade_id for trade_id, _ in effects)
    for trade_id, row in trades.items():
        want = expected_effect(row)
        buyer_posted, buyer_pending = effects.get((trade_id, row["buyer"]), (0, 0))
        seller_posted, seller_pending = effects.get((trade_id, row["seller"]), (0, 0))
        seen: dict[str, Any] = {
            "state": row["state"],
            "buyer": (buyer_posted, buyer_pending),
            "seller": (seller_posted, seller_pending),
            "held_minor": row["held_minor"],
            "refunds": len(refunds.get(trade_id, [])),
        }
        if want is None:
            ok = touched[trade_id] == 0 and row["held_minor"] == 0
        else:
            buyer, seller, held = want
            ok = (
                (buyer_posted, seller_posted) == (buyer, seller)
                and (buyer_pending, seller_pending) == (-held, held)
                and row["held_minor"] == held
            )
        check.case(ok, f"trade {trade_id}: want {want}, {seen}")
    for trade_id in touched:
        check.case(trade_id in trades, f"transfers of trade {trade_id}, which is not there")
    return check


def check_holds(trades: dict[str, asyncpg.Record], ledger: Ledger) -> Check:
    """A trade holds its money in one open hold at a time (a partial refund voids it and
    holds the rest anew); every hold of a trade that is not open resolved exactly once."""
    check = Check("every trade hold resolves exactly once, and only the trade's own is open")
    holds: dict[str, list[asyncpg.Record]] = collections.defaultdict(list)
    for row in ledger.transfers_by_id.values():
        if row["trade_id"] is not None and row["pending"]:
            holds[row["trade_id"]].append(row)
    for trade_id, rows in holds.items():
        trade = trades.get(trade_id)
        open_holds = [r for r in rows if r["status"] == "pending"]
        want_open = [] if trade is None or trade["held_minor"] == 0 else [trade["hold_transfer_id"]]
        ok = [r["id"] for r in open_holds] == want_open and all(
            r["amount_minor"] == trade["held_minor"] for r in open_holds if trade is not None
        )
        check.case(ok, f"trade {trade_id}: open holds {[dict(r) for r in open_holds]}")
        for row in rows:
            entries = ledger.resolutions.get(row["id"], 0)
            resolved = row["status"] in ("posted", "voided")
            ok = entries == 2 if resolved else (entries == 0 and row["status"] == "pending")
            check.case(ok, f"hold {row['id']} of trade {trade_id}: {row['status']}, {entries}")
    return check
