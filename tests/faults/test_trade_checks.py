"""The checker's trade invariants can fail: each is fed a consistent trade, then the same
trade with one thing wrong (no database: rows are dicts, as asyncpg records read)."""

from __future__ import annotations

from typing import Any

from bench.faults.checker import Ledger
from bench.faults.history import Op, Outcome
from bench.faults.trade_checks import check_effects, check_holds, check_states

BUYER, SELLER = "11", "22"


def trade_row(**changes: Any) -> dict[str, Any]:
    row = {
        "id": "7",
        "out_trade_no": "k",
        "seller": SELLER,
        "buyer": BUYER,
        "amount_minor": 5,
        "state": "TRADE_SUCCESS",
        "held_minor": 0,
        "settled_minor": 5,
        "refunded_minor": 2,
        "fee_minor": 0,
        "fee_refunded_minor": 0,
        "close_reason": None,
        "hold_transfer_id": "100",
    }
    return {**row, **changes}


def violations(check: Any) -> int:
    assert check.checked > 0
    return int(check.violations)


def test_a_settled_trade_moved_amount_less_refunds_to_the_seller() -> None:
    trades: Any = {"7": trade_row()}
    right = {("7", BUYER): (-3, 0), ("7", SELLER): (3, 0)}
    assert violations(check_effects(trades, {}, right)) == 0
    refund_lost = {("7", BUYER): (-5, 0), ("7", SELLER): (5, 0)}
    assert violations(check_effects(trades, {}, refund_lost)) == 1


def test_a_paid_trade_holds_exactly_its_held_amount() -> None:
    trades: Any = {"7": trade_row(state="WAIT_SELLER_SEND_GOODS", held_minor=3, settled_minor=0)}
    right = {("7", BUYER): (0, -3), ("7", SELLER): (0, 3)}
    assert violations(check_effects(trades, {}, right)) == 0
    posted_early = {("7", BUYER): (-3, 0), ("7", SELLER): (3, 0)}
    assert violations(check_effects(trades, {}, posted_early)) == 1


def test_a_trade_closed_unpaid_moved_nothing() -> None:
    trades: Any = {"7": trade_row(state="TRADE_CLOSED", close_reason="seller_closed")}
    assert violations(check_effects(trades, {}, {})) == 0
    moved = {("7", BUYER): (0, 0), ("7", SELLER): (0, 0)}
    assert violations(check_effects(trades, {}, moved)) == 1


def hold(transfer_id: str, status: str, amount_minor: int = 3) -> dict[str, Any]:
    return {
        "id": transfer_id,
        "trade_id": "7",
        "pending": True,
        "status": status,
        "amount_minor": amount_minor,
    }


def test_a_trade_hold_resolved_twice_or_a_second_open_hold_is_caught() -> None:
    trades: Any = {"7": trade_row(state="WAIT_BUYER_CONFIRM_GOODS", held_minor=3)}
    transfers: Any = {"99": hold("99", "voided", 5), "100": hold("100", "pending")}
    right = Ledger(rows_by_op={}, transfers_by_id=transfers, resolutions={"99": 2})
    assert violations(check_holds(trades, right)) == 0
    twice = Ledger(rows_by_op={}, transfers_by_id=transfers, resolutions={"99": 4})
    assert violations(check_holds(trades, twice)) == 1
    transfers["101"] = hold("101", "pending")
    second = Ledger(rows_by_op={}, transfers_by_id=transfers, resolutions={"99": 2})
    assert violations(check_holds(trades, second)) == 1


def test_a_trade_not_in_the_state_its_last_step_answered_is_caught() -> None:
    told = {"id": "7", "state": "WAIT_BUYER_PAY", "held_minor": 0, "settled_minor": 0}
    created = Op("k", "trade", "POST", "/v1/trades", {}, outcome=Outcome.OK)
    created.result = {**told, "refunded_minor": 0}
    pay = Op("k-pay", "trade_pay", "POST", "/v1/trades/7/pay", {}, outcome=Outcome.OK)
    pay.trade_key = "k"
    pay.result = {**created.result, "state": "WAIT_SELLER_SEND_GOODS", "held_minor": 5}
    paid: Any = {"7": trade_row(state="WAIT_SELLER_SEND_GOODS", held_minor=5, settled_minor=0)}
    paid["7"]["refunded_minor"] = 0
    assert violations(check_states([created], paid, {"k": [pay]})) == 0
    unpaid: Any = {"7": trade_row(state="WAIT_BUYER_PAY", held_minor=0, settled_minor=0)}
    assert violations(check_states([created], unpaid, {"k": [pay]})) == 1
