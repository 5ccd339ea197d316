"""Escrow trades on a real database: one test per transition and per illegal step (each
checked to change nothing), timers on a controlled clock, a restart in the middle, the
fee settlement amounts, and a race of confirm, auto-confirm and refund."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import pytest

from engine import AccountKind, CreateAccount, CreateTransfers, Engine, Idempotency, TransferSpec
from engine.products import TIMER_JOBS, Step, run_step
from engine.products.fees import set_rate_bp
from engine.products.timers import TimerJob
from engine.products.trade_refunds import (
    REFUNDS_PER_TRADE_MAX,
    RefundAnswer,
    RefundRequest,
    refund,
)
from engine.products.trade_timers import AUTO_CONFIRM, CLOSE_UNPAID, FINISH
from engine.products.trades import (
    CloseReason,
    ConfirmedBy,
    NewTrade,
    TradeState,
    TradeView,
    close,
    confirm,
    create,
    new_trade_error,
    pay,
    read_trade,
    ship,
)
from engine.reconcile import reconcile
from engine.sweeper import Sweeper
from tests.conftest import TEST_ENGINE_CONFIG

T = TypeVar("T")
SCOPE = "p1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
FUNDS = 10_000
RATE_BP = 60  # 0.6 %
PRICE = 2_000  # fee at 0.6 %: 12


class Clock:
    """The engine's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclasses.dataclass
class Shop:
    engine: Engine
    clock: Clock
    dsn: str
    buyer: int
    seller: int
    bank: int

    async def reopen(self) -> None:
        """A restart: close the engine and open a new one on the same database."""
        await self.engine.close()
        self.engine = await Engine.open(self.dsn, config=TEST_ENGINE_CONFIG, clock=self.clock)

    async def step(
        self, fn: Callable[[Step], Awaitable[T]], answer: type[T], key: str | None = None
    ) -> Any:
        idempotency = None if key is None else Idempotency(scope=SCOPE, key=key, fingerprint=b"f")
        return await run_step(
            self.engine, fn, answer_type=answer, scope=SCOPE, idempotency=idempotency
        )

    async def ok(self, fn: Callable[[Step], Awaitable[TradeView]]) -> TradeView:
        outcome = await self.step(fn, TradeView)
        assert outcome.refusal is None, outcome.refusal
        value: TradeView = outcome.value
        return value

    async def refund(self, trade_id: int, amount: int, no: str = "r1") -> Any:
        request = RefundRequest(out_request_no=no, amount_minor=amount, reason="test")
        return await self.step(refund(trade_id, request), RefundAnswer)

    async def open_trade(self, amount: int = PRICE, **terms: Any) -> TradeView:
        fields: dict[str, Any] = {
            "out_trade_no": f"T{self.engine.next_id()}",
            "seller_account_id": self.seller,
            "buyer_account_id": self.buyer,
            "amount_minor": amount,
            "currency": "CNY",
            "subject": "a teapot",
            **terms,
        }
        return await self.ok(create(NewTrade(**fields)))

    async def advance_to(self, state: TradeState, amount: int = PRICE) -> TradeView:
        """A new trade brought to `state` by the usual path."""
        trade = await self.open_trade(amount)
        if state is TradeState.TRADE_CLOSED:
            return await self.ok(close(trade.id))
        path = [pay, ship, confirm]
        reached = [
            TradeState.WAIT_BUYER_PAY,
            TradeState.WAIT_SELLER_SEND_GOODS,
            TradeState.WAIT_BUYER_CONFIRM_GOODS,
            TradeState.TRADE_SUCCESS,
        ]
        if state is TradeState.TRADE_FINISHED:
            for transition in path:
                trade = await self.ok(transition(trade.id))
            self.clock.advance(days=90)
            assert await self.fire(FINISH) == 1
            found = await read_trade(self.engine, trade.id, scope=SCOPE)
            assert found is not None
            return found
        for transition in path[: reached.index(state)]:
            trade = await self.ok(transition(trade.id))
        assert trade.state is state
        return trade

    async def fire(self, job: TimerJob) -> int:
        return int(await job.run_once(self.engine, now=self.clock(), limit=job.batch_size_max))

    async def balances(self) -> dict[str, tuple[int, int]]:
        """(posted, available) of the buyer, the seller and the house's fee account."""
        found = {}
        async with self.engine.pool.acquire() as conn:
            fees = await conn.fetchval("SELECT account_id FROM house_accounts WHERE name='fees'")
        for name, account_id in (("buyer", self.buyer), ("seller", self.seller), ("fees", fees)):
            if account_id is None:
                found[name] = (0, 0)
                continue
            account = await self.engine.account(account_id, scope=None)
            assert account is not None
            found[name] = (account.posted_minor, account.available_minor)
        return found

    async def snapshot(self) -> dict[str, Any]:
        """Everything an illegal step must leave as it was."""
        async with self.engine.pool.acquire() as conn:
            tables = {
                table: [dict(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY id")]
                for table in ("trades", "trade_refunds", "transfers", "outbox_events", "accounts")
            }
        return {**tables, "balances": await self.balances()}

    async def events(self, trade_id: int) -> list[str]:
        async with self.engine.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT type FROM outbox_events WHERE subject_id = $1 ORDER BY id", trade_id
            )
        return [r["type"] for r in rows]

    async def assert_reconciled(self) -> None:
        async with self.engine.pool.acquire() as conn:
            broken = [o for o in await reconcile(conn) if o.violations]
        assert broken == []

    async def hold_of(self, trade: TradeView) -> dict[str, Any]:
        assert trade.hold_transfer_id is not None
        async with self.engine.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT amount_minor, status FROM transfers WHERE id = $1", trade.hold_transfer_id
            )
        return dict(row)


async def _open_account(engine: Engine, kind: AccountKind) -> int:
    result = await engine.submit(CreateAccount(currency="CNY", kind=kind, scope=SCOPE))
    assert result.account is not None
    return result.account.id


@pytest.fixture
async def shop(dsn: str) -> AsyncIterator[Shop]:
    clock = Clock()
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    bank = await _open_account(engine, AccountKind.SYSTEM)
    buyer = await _open_account(engine, AccountKind.USER)
    seller = await _open_account(engine, AccountKind.MERCHANT)
    spec = TransferSpec(
        debit_account_id=bank, credit_account_id=buyer, amount_minor=FUNDS, currency="CNY"
    )
    assert (await engine.submit(CreateTransfers(transfers=(spec,), scope=SCOPE))).ok
    async with engine.pool.acquire() as conn:
        await set_rate_bp(conn, seller, RATE_BP, now=T0)
    opened = Shop(engine=engine, clock=clock, dsn=dsn, buyer=buyer, seller=seller, bank=bank)
    try:
        yield opened
    finally:
        await opened.engine.close()


# -- transitions ------------------------------------------------------------------------------


async def test_create_opens_an_unpaid_trade_with_its_deadline(shop: Shop) -> None:
    trade = await shop.open_trade(timeout_express="90m")
    assert trade.state is TradeState.WAIT_BUYER_PAY
    assert trade.pay_expires_at == T0 + timedelta(minutes=90)
    assert trade.held_minor == trade.refunded_minor == trade.refundable_minor == 0
    assert await read_trade(shop.engine, trade.id, scope=SCOPE) == trade
    assert await read_trade(shop.engine, trade.id, scope="p2") is None
    assert await shop.balances() == {
        "buyer": (FUNDS, FUNDS),
        "seller": (0, 0),
        "fees": (0, 0),
    }


async def test_pay_holds_the_buyers_money_for_the_seller(shop: Shop) -> None:
    trade = await shop.open_trade()
    paid = await shop.ok(pay(trade.id))
    assert paid.state is TradeState.WAIT_SELLER_SEND_GOODS and paid.paid_at == T0
    assert paid.held_minor == PRICE and paid.refundable_minor == PRICE
    assert await shop.hold_of(paid) == {"amount_minor": PRICE, "status": "pending"}
    assert (await shop.balances())["buyer"] == (FUNDS, FUNDS - PRICE)
    seller = await shop.engine.account(shop.seller, scope=SCOPE)
    assert seller is not None and seller.credits_pending_minor == PRICE
    assert await shop.events(trade.id) == ["trade.paid"]


async def test_ship_starts_the_auto_confirm_clock(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.WAIT_SELLER_SEND_GOODS)
    shop.clock.advance(hours=1)
    shipped = await shop.ok(ship(trade.id))
    assert shipped.state is TradeState.WAIT_BUYER_CONFIRM_GOODS
    assert shipped.confirm_expires_at == shop.clock.now + timedelta(days=10)
    assert await shop.events(trade.id) == ["trade.paid", "trade.shipped"]


async def test_confirm_posts_the_hold_to_the_seller_and_takes_the_fee(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.WAIT_BUYER_CONFIRM_GOODS)
    done = await shop.ok(confirm(trade.id))
    assert done.state is TradeState.TRADE_SUCCESS and done.confirmed_by is ConfirmedBy.BUYER
    assert done.settled_minor == PRICE and done.held_minor == 0 and done.fee_minor == 12
    assert done.finish_at == T0 + timedelta(days=90)
    assert await shop.hold_of(done) == {"amount_minor": PRICE, "status": "posted"}
    assert await shop.balances() == {
        "buyer": (FUNDS - PRICE, FUNDS - PRICE),
        "seller": (PRICE - 12, PRICE - 12),
        "fees": (12, 12),
    }
    assert (await shop.events(trade.id))[-1] == "trade.succeeded"
    await shop.assert_reconciled()


@pytest.mark.parametrize(
    ("amount", "rate_bp", "fee"),
    [
        (9_876, 60, 59),  # 59.256 fen
        (83, 60, 0),  # 0.498 fen: no fee transfer at all
        (250, 20, 1),  # exactly half a fen rounds up
        (10_000, 0, 0),  # a seller without a rate
    ],
)
async def test_settlement_fee_amounts(shop: Shop, amount: int, rate_bp: int, fee: int) -> None:
    async with shop.engine.pool.acquire() as conn:
        await set_rate_bp(conn, shop.seller, rate_bp, now=T0)
    trade = await shop.advance_to(TradeState.TRADE_SUCCESS, amount=amount)
    assert trade.fee_minor == fee
    balances = await shop.balances()
    assert balances["seller"] == (amount - fee, amount - fee)
    assert balances["fees"] == (fee, fee)
    async with shop.engine.pool.acquire() as conn:
        fee_transfers = await conn.fetchval(
            "SELECT count(*) FROM transfers WHERE metadata->>'fee_rate_bp' IS NOT NULL"
        )
    assert fee_transfers == (1 if fee else 0)
    await shop.assert_reconciled()


async def test_seller_closes_an_unpaid_trade(shop: Shop) -> None:
    trade = await shop.open_trade()
    closed = await shop.ok(close(trade.id))
    assert closed.state is TradeState.TRADE_CLOSED
    assert closed.close_reason is CloseReason.SELLER_CLOSED and closed.closed_at == T0
    assert await shop.events(trade.id) == ["trade.closed"]


# -- timers -----------------------------------------------------------------------------------


async def test_an_unpaid_trade_closes_at_its_deadline_once(shop: Shop) -> None:
    trade = await shop.open_trade(timeout_express="30m")
    later = await shop.open_trade(timeout_express="2h")
    shop.clock.advance(minutes=29, seconds=59)
    assert await shop.fire(CLOSE_UNPAID) == 0
    shop.clock.advance(seconds=1)
    assert await shop.fire(CLOSE_UNPAID) == 1
    assert await shop.fire(CLOSE_UNPAID) == 0
    closed = await read_trade(shop.engine, trade.id, scope=SCOPE)
    assert closed is not None and closed.state is TradeState.TRADE_CLOSED
    assert closed.close_reason is CloseReason.PAY_TIMEOUT
    untouched = await read_trade(shop.engine, later.id, scope=SCOPE)
    assert untouched == later
    assert await shop.events(trade.id) == ["trade.closed"]


async def test_a_shipped_trade_confirms_itself_after_ten_days(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.WAIT_BUYER_CONFIRM_GOODS)
    shop.clock.advance(days=10, seconds=-1)
    assert await shop.fire(AUTO_CONFIRM) == 0
    shop.clock.advance(seconds=1)
    assert await shop.fire(AUTO_CONFIRM) == 1
    assert await shop.fire(AUTO_CONFIRM) == 0
    done = await read_trade(shop.engine, trade.id, scope=SCOPE)
    assert done is not None and done.state is TradeState.TRADE_SUCCESS
    assert done.confirmed_by is ConfirmedBy.TIMER
    assert (await shop.balances())["seller"] == (PRICE - 12, PRICE - 12)
    await shop.assert_reconciled()


async def test_a_successful_trade_finishes_when_the_refund_window_closes(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.TRADE_SUCCESS)
    shop.clock.advance(days=90, seconds=-1)
    assert await shop.fire(FINISH) == 0
    shop.clock.advance(seconds=1)
    assert await shop.fire(FINISH) == 1
    assert await shop.fire(FINISH) == 0
    done = await read_trade(shop.engine, trade.id, scope=SCOPE)
    assert done is not None and done.state is TradeState.TRADE_FINISHED
    assert done.finished_at == shop.clock.now
    assert (await shop.events(trade.id))[-1] == "trade.finished"


async def test_the_timers_are_registered_with_the_sweeper() -> None:
    assert {CLOSE_UNPAID, AUTO_CONFIRM, FINISH} <= set(TIMER_JOBS)


async def test_a_restart_in_the_middle_loses_no_timer_and_fires_none_twice(shop: Shop) -> None:
    shipped = await shop.advance_to(TradeState.WAIT_BUYER_CONFIRM_GOODS)
    unpaid = await shop.open_trade(timeout_express="1d")
    await shop.reopen()
    shop.clock.advance(days=10)
    assert await shop.fire(CLOSE_UNPAID) == 1
    assert await shop.fire(AUTO_CONFIRM) == 1
    await shop.reopen()
    assert await shop.fire(CLOSE_UNPAID) == 0
    assert await shop.fire(AUTO_CONFIRM) == 0
    done = await read_trade(shop.engine, shipped.id, scope=SCOPE)
    assert done is not None and done.state is TradeState.TRADE_SUCCESS
    # The flow goes on after the restart: a refund, then the window closes.
    assert (await shop.refund(done.id, 500)).value is not None
    shop.clock.advance(days=90)
    assert await shop.fire(FINISH) == 1
    assert await shop.events(shipped.id) == [
        "trade.paid",
        "trade.shipped",
        "trade.succeeded",
        "trade.refunded",
        "trade.finished",
    ]
    assert await shop.events(unpaid.id) == ["trade.closed"]
    await shop.assert_reconciled()


# -- refunds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state", [TradeState.WAIT_SELLER_SEND_GOODS, TradeState.WAIT_BUYER_CONFIRM_GOODS]
)
async def test_a_partial_refund_before_confirmation_releases_part_of_the_hold(
    shop: Shop, state: TradeState
) -> None:
    trade = await shop.advance_to(state)
    answer = (await shop.refund(trade.id, 500)).value
    assert answer.refund.amount_minor == 500 and not answer.refund.after_settlement
    assert answer.refund.fee_refunded_minor == 0
    after = answer.trade
    assert after.state is state and after.held_minor == PRICE - 500
    assert after.refunded_minor == 500 and after.refundable_minor == PRICE - 500
    assert answer.refund.transfer_id == trade.hold_transfer_id
    assert await shop.hold_of(trade) == {"amount_minor": PRICE, "status": "voided"}
    assert await shop.hold_of(after) == {"amount_minor": PRICE - 500, "status": "pending"}
    assert (await shop.balances())["buyer"] == (FUNDS, FUNDS - PRICE + 500)
    # The rest settles: the fee is on what the seller keeps.
    if state is TradeState.WAIT_SELLER_SEND_GOODS:
        await shop.ok(ship(trade.id))
    done = await shop.ok(confirm(trade.id))
    assert done.settled_minor == PRICE - 500 and done.fee_minor == 9  # 0.6 % of 1500
    assert await shop.balances() == {
        "buyer": (FUNDS - PRICE + 500, FUNDS - PRICE + 500),
        "seller": (PRICE - 500 - 9, PRICE - 500 - 9),
        "fees": (9, 9),
    }
    await shop.assert_reconciled()


async def test_a_full_refund_before_confirmation_closes_the_trade(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.WAIT_SELLER_SEND_GOODS)
    assert (await shop.refund(trade.id, 700, "a")).value is not None
    answer = (await shop.refund(trade.id, PRICE - 700, "b")).value
    closed = answer.trade
    assert closed.state is TradeState.TRADE_CLOSED
    assert closed.close_reason is CloseReason.FULLY_REFUNDED
    assert closed.held_minor == 0 and closed.refunded_minor == PRICE
    assert await shop.hold_of(closed) == {"amount_minor": PRICE - 700, "status": "voided"}
    assert (await shop.balances())["buyer"] == (FUNDS, FUNDS)
    assert await shop.events(trade.id) == [
        "trade.paid",
        "trade.refunded",
        "trade.refunded",
        "trade.closed",
    ]
    await shop.assert_reconciled()


async def test_refunds_after_confirmation_come_from_the_seller_with_the_fee_share(
    shop: Shop,
) -> None:
    async with shop.engine.pool.acquire() as conn:
        await set_rate_bp(conn, shop.seller, 100, now=T0)  # 1 %: the fee on 2000 is 20
    trade = await shop.advance_to(TradeState.TRADE_SUCCESS)
    assert trade.fee_minor == 20
    # 333 of 2000 is 3.33 of the fee: 3; then 666 of 2000 in all: 6.66, so 4 more.
    first = (await shop.refund(trade.id, 333, "a")).value
    assert first.refund.after_settlement and first.refund.fee_refunded_minor == 3
    second = (await shop.refund(trade.id, 333, "b")).value
    assert second.refund.fee_refunded_minor == 4
    assert second.trade.state is TradeState.TRADE_SUCCESS
    assert await shop.balances() == {
        "buyer": (FUNDS - PRICE + 666, FUNDS - PRICE + 666),
        "seller": (PRICE - 20 - 666 + 7, PRICE - 20 - 666 + 7),
        "fees": (20 - 7, 20 - 7),
    }
    # The rest: the whole fee is back, the trade closes.
    last = (await shop.refund(trade.id, PRICE - 666, "c")).value
    assert last.refund.fee_refunded_minor == 13
    assert last.trade.fee_refunded_minor == last.trade.fee_minor == 20
    assert last.trade.state is TradeState.TRADE_CLOSED
    assert await shop.balances() == {
        "buyer": (FUNDS, FUNDS),
        "seller": (0, 0),
        "fees": (0, 0),
    }
    await shop.assert_reconciled()


async def test_a_refund_the_seller_cannot_cover_changes_nothing(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.TRADE_SUCCESS)
    # The seller spends most of what it got.
    spec = TransferSpec(
        debit_account_id=shop.seller, credit_account_id=shop.bank, amount_minor=1900,
        currency="CNY",
    )  # fmt: skip
    assert (await shop.engine.submit(CreateTransfers(transfers=(spec,), scope=SCOPE))).ok
    before = await shop.snapshot()
    outcome = await shop.refund(trade.id, 500)
    assert outcome.refusal is not None and outcome.refusal.code == "insufficient_funds"
    assert "seller" in outcome.refusal.detail
    assert await shop.snapshot() == before
    assert (await shop.refund(trade.id, 80)).value is not None  # what it has (88) will do


async def test_an_out_request_no_is_answered_once(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.WAIT_SELLER_SEND_GOODS)
    first = (await shop.refund(trade.id, 300, "same")).value
    before = await shop.snapshot()
    again = (await shop.refund(trade.id, 300, "same")).value
    assert again.refund == first.refund and again.trade == first.trade
    other = await shop.refund(trade.id, 301, "same")
    assert other.refusal is not None and other.refusal.code == "out_request_no_reused"
    assert await shop.snapshot() == before


async def test_a_refund_after_the_window_is_refused_even_before_the_timer(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.TRADE_SUCCESS)
    shop.clock.advance(days=90)
    before = await shop.snapshot()
    outcome = await shop.refund(trade.id, 1)
    assert outcome.refusal is not None
    assert outcome.refusal.code == "trade_refund_window_closed"
    assert await shop.snapshot() == before


@pytest.mark.parametrize("state", [TradeState.WAIT_SELLER_SEND_GOODS, TradeState.TRADE_SUCCESS])
async def test_refunding_more_than_was_paid_changes_nothing(shop: Shop, state: TradeState) -> None:
    trade = await shop.advance_to(state)
    assert (await shop.refund(trade.id, 1500, "a")).value is not None
    before = await shop.snapshot()
    outcome = await shop.refund(trade.id, 501, "b")
    assert outcome.refusal is not None and outcome.refusal.code == "refund_exceeds_paid"
    assert outcome.refusal.extensions["refundable_minor"] == 500
    assert await shop.snapshot() == before


# -- illegal steps ------------------------------------------------------------------------------

_ALL_STATES = list(TradeState)
_ACTIONS: dict[str, Callable[[int], Callable[[Step], Awaitable[Any]]]] = {
    "pay": pay,
    "ship": ship,
    "confirm": confirm,
    "close": close,
    "refund": lambda i: refund(i, RefundRequest(out_request_no="x", amount_minor=1)),
}
_LEGAL = {
    ("pay", TradeState.WAIT_BUYER_PAY),
    ("close", TradeState.WAIT_BUYER_PAY),
    ("ship", TradeState.WAIT_SELLER_SEND_GOODS),
    ("confirm", TradeState.WAIT_BUYER_CONFIRM_GOODS),
    ("refund", TradeState.WAIT_SELLER_SEND_GOODS),
    ("refund", TradeState.WAIT_BUYER_CONFIRM_GOODS),
    ("refund", TradeState.TRADE_SUCCESS),
}


@pytest.mark.parametrize(
    ("action", "state"),
    [(a, s) for a in _ACTIONS for s in _ALL_STATES if (a, s) not in _LEGAL],
)
async def test_an_illegal_step_is_a_conflict_and_changes_nothing(
    shop: Shop, action: str, state: TradeState
) -> None:
    trade = await shop.advance_to(state)
    before = await shop.snapshot()
    answer = RefundAnswer if action == "refund" else TradeView
    outcome = await shop.step(_ACTIONS[action](trade.id), answer, key=f"k-{action}")
    assert outcome.refusal is not None and outcome.refusal.code == "trade_state_conflict"
    assert outcome.refusal.extensions["state"] == state.value
    after = await shop.snapshot()
    assert after == before
    replayed = await shop.step(_ACTIONS[action](trade.id), answer, key=f"k-{action}")
    assert replayed.replayed and replayed.refusal == outcome.refusal


async def test_paying_after_the_deadline_is_refused_before_the_timer_fires(shop: Shop) -> None:
    trade = await shop.open_trade(timeout_express="1m")
    shop.clock.advance(minutes=1)
    before = await shop.snapshot()
    outcome = await shop.step(pay(trade.id), TradeView)
    assert outcome.refusal is not None and outcome.refusal.code == "trade_pay_expired"
    assert await shop.snapshot() == before


async def test_paying_without_the_money_changes_nothing(shop: Shop) -> None:
    trade = await shop.open_trade(amount=FUNDS + 1)
    before = await shop.snapshot()
    outcome = await shop.step(pay(trade.id), TradeView)
    assert outcome.refusal is not None and outcome.refusal.code == "insufficient_funds"
    assert await shop.snapshot() == before


async def test_a_paid_step_replays_under_its_key(shop: Shop) -> None:
    trade = await shop.open_trade()
    first = await shop.step(pay(trade.id), TradeView, key="pay-1")
    again = await shop.step(pay(trade.id), TradeView, key="pay-1")
    assert again.replayed and again.value == first.value
    assert (await shop.balances())["buyer"] == (FUNDS, FUNDS - PRICE)


async def test_an_out_trade_no_is_unique_per_seller(shop: Shop) -> None:
    trade = await shop.open_trade(out_trade_no="ORDER_1")
    before = await shop.snapshot()
    fields = {f: getattr(trade, f) for f in NewTrade.__struct_fields__}
    outcome = await shop.step(create(NewTrade(**fields)), TradeView)
    assert outcome.refusal is not None and outcome.refusal.code == "out_trade_no_taken"
    assert outcome.refusal.extensions["trade_id"] == str(trade.id)
    assert await shop.snapshot() == before


async def test_create_refuses_someone_elses_or_a_foreign_currency_account(shop: Shop) -> None:
    theirs = (await shop.engine.submit(CreateAccount(currency="CNY", kind=AccountKind.USER,
                                                      scope="p2"))).account  # fmt: skip
    dollars = (await shop.engine.submit(CreateAccount(currency="USD", kind=AccountKind.USER,
                                                       scope=SCOPE))).account  # fmt: skip
    assert theirs is not None and dollars is not None
    base = NewTrade(
        out_trade_no="A", seller_account_id=shop.seller, buyer_account_id=theirs.id,
        amount_minor=1, currency="CNY", subject="s",
    )  # fmt: skip
    before = await shop.snapshot()
    outcome = await shop.step(create(base), TradeView)
    assert outcome.refusal is not None and outcome.refusal.code == "account_not_found"
    outcome = await shop.step(
        create(msgspec.structs.replace(base, buyer_account_id=dollars.id)), TradeView
    )
    assert outcome.refusal is not None and outcome.refusal.code == "currency_mismatch"
    assert await shop.snapshot() == before


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"out_trade_no": "has space"}, "out_trade_no"),
        ({"out_trade_no": "x" * 65}, "out_trade_no"),
        ({"buyer_account_id": 1}, "buyer_account_id"),
        ({"timeout_express": "1c"}, "timeout_express"),
        ({"timeout_express": "16d"}, "timeout_express"),
        ({"timeout_express": "0m"}, "timeout_express"),
        ({"confirm_timeout_express": "23h"}, "confirm_timeout_express"),
        ({"refund_window_express": "366d"}, "refund_window_express"),
        ({"subject": "nul\x00"}, "subject"),
        ({"notify_url": "ftp://x"}, "notify_url"),
        ({"currency": "XXY"}, "currency"),
    ],
)
def test_new_trade_terms_are_checked(changes: dict[str, Any], field: str) -> None:
    base = NewTrade(
        out_trade_no="A_1", seller_account_id=1, buyer_account_id=2, amount_minor=1,
        currency="CNY", subject="s", timeout_express="1m",
    )  # fmt: skip
    assert new_trade_error(base) is None
    assert new_trade_error(msgspec.structs.replace(base, timeout_express="15d")) is None
    error = new_trade_error(msgspec.structs.replace(base, **changes))
    assert error is not None and error[0] == field


# -- races ------------------------------------------------------------------------------------


async def test_confirm_auto_confirm_and_refund_race_to_one_outcome(shop: Shop) -> None:
    trades = [await shop.advance_to(TradeState.WAIT_BUYER_CONFIRM_GOODS) for _ in range(4)]
    shop.clock.advance(days=10)  # every one is due for auto-confirm

    async def race(trade: TradeView) -> tuple[Any, int, Any]:
        confirmed, fired, refunded = await asyncio.gather(
            shop.step(confirm(trade.id), TradeView),
            AUTO_CONFIRM.run_once(shop.engine, now=shop.clock(), limit=1),
            shop.refund(trade.id, PRICE),
        )
        return confirmed, fired, refunded

    results = await asyncio.gather(*(race(t) for t in trades))
    for trade, (confirmed, _fired, refunded) in zip(trades, results, strict=True):
        # The full refund always goes through: before settlement from the hold, after it
        # from the seller, who has just been paid.
        assert refunded.value is not None, refunded.refusal
        final = await read_trade(shop.engine, trade.id, scope=SCOPE)
        assert final is not None and final.state is TradeState.TRADE_CLOSED
        events = await shop.events(trade.id)
        assert events.count("trade.succeeded") <= 1
        if confirmed.value is not None:
            assert final.confirmed_by is ConfirmedBy.BUYER
        settled = final.settled_minor > 0
        assert events.count("trade.succeeded") == int(settled)
        assert refunded.value.refund.after_settlement == settled
    # One auto-confirm job may fire several trades; no trade settles twice.
    assert await shop.balances() == {
        "buyer": (FUNDS, FUNDS),
        "seller": (0, 0),
        "fees": (0, 0),
    }
    await shop.assert_reconciled()


async def test_a_timer_does_not_fire_on_a_trade_that_moved_on(shop: Shop) -> None:
    refunded = await shop.advance_to(TradeState.WAIT_BUYER_CONFIRM_GOODS)
    confirmed = await shop.advance_to(TradeState.WAIT_BUYER_CONFIRM_GOODS)
    shop.clock.advance(days=11)
    assert (await shop.refund(refunded.id, PRICE)).value is not None
    await shop.ok(confirm(confirmed.id))
    before = await shop.snapshot()
    assert await shop.fire(AUTO_CONFIRM) == 0
    assert await shop.snapshot() == before


async def test_the_sweeper_fires_the_trade_timers(shop: Shop) -> None:
    unpaid = await shop.open_trade(timeout_express="1h")
    shipped = await shop.advance_to(TradeState.WAIT_BUYER_CONFIRM_GOODS)
    sweeper = Sweeper(shop.engine)
    await sweeper.run_once()
    assert await read_trade(shop.engine, unpaid.id, scope=SCOPE) == unpaid
    shop.clock.advance(days=10)
    await sweeper.run_once()
    closed = await read_trade(shop.engine, unpaid.id, scope=SCOPE)
    done = await read_trade(shop.engine, shipped.id, scope=SCOPE)
    assert closed is not None and closed.state is TradeState.TRADE_CLOSED
    assert done is not None and done.state is TradeState.TRADE_SUCCESS
    shop.clock.advance(days=90)
    await sweeper.run_once()
    finished = await read_trade(shop.engine, shipped.id, scope=SCOPE)
    assert finished is not None and finished.state is TradeState.TRADE_FINISHED
    assert await shop.events(shipped.id) == [
        "trade.paid",
        "trade.shipped",
        "trade.succeeded",
        "trade.finished",
    ]


async def test_a_trade_takes_at_most_its_refund_limit(shop: Shop) -> None:
    trade = await shop.advance_to(TradeState.WAIT_SELLER_SEND_GOODS)
    for n in range(REFUNDS_PER_TRADE_MAX):
        assert (await shop.refund(trade.id, 1, f"r{n}")).value is not None
    before = await shop.snapshot()
    outcome = await shop.refund(trade.id, 1, "one_more")
    assert outcome.refusal is not None and outcome.refusal.code == "refund_limit_reached"
    assert await shop.snapshot() == before
    found = await read_trade(shop.engine, trade.id, scope=SCOPE)
    assert found is not None and found.held_minor == PRICE - REFUNDS_PER_TRADE_MAX
    assert await shop.hold_of(found) == {
        "amount_minor": PRICE - REFUNDS_PER_TRADE_MAX,
        "status": "pending",
    }
    await shop.assert_reconciled()
