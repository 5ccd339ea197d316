"""Channel requests as steps on a real database, with a controlled clock: the hold
opened with the row, the callback and the deadline racing, a restart between them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from engine import AccountKind, CreateAccount, CreateTransfers, Engine, TransferSpec
from engine.products import TIMER_JOBS, run_step
from engine.products.banks import (
    CHANNEL_TYPES,
    BankCallback,
    Channel,
    ChannelConfig,
    Direction,
)
from engine.products.channels import (
    TIME_OUT,
    CallbackAnswer,
    CallbackOutcome,
    ChannelRequestView,
    RequestState,
    open_request,
    settle,
    time_out_once,
)
from engine.reconcile import reconcile
from tests.conftest import TEST_ENGINE_CONFIG


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _channel(name: str = "card") -> Channel:
    (channel_type,) = [t for t in CHANNEL_TYPES if t.name == name]
    return channel_type(ChannelConfig(base_url="http://127.0.0.1:1", secret="s" * 16))


async def _funded_user(engine: Engine, amount: int) -> int:
    opened = await engine.submit(CreateAccount(currency="CNY", kind=AccountKind.USER, scope="p1"))
    bank = await engine.submit(CreateAccount(currency="CNY", kind=AccountKind.SYSTEM))
    assert opened.account is not None and bank.account is not None
    spec = TransferSpec(
        debit_account_id=bank.account.id,
        credit_account_id=opened.account.id,
        amount_minor=amount,
        currency="CNY",
    )
    assert (await engine.submit(CreateTransfers(transfers=(spec,)))).ok
    return opened.account.id


async def _open(
    engine: Engine, user: int, kind: Direction, amount: int = 100
) -> ChannelRequestView:
    step = open_request(
        kind=kind,
        channel=_channel(),
        account_id=user,
        amount_minor=amount,
        currency="CNY",
        destination="62220202" if kind is Direction.WITHDRAWAL else None,
        notify_url=None,
        metadata={"order": "o-1"},
    )
    outcome = await run_step(
        engine, step, answer_type=ChannelRequestView, scope="p1", idempotency=None
    )
    assert outcome.value is not None, outcome.refusal
    return outcome.value


async def _settle(engine: Engine, view: ChannelRequestView, status: str) -> CallbackAnswer:
    callback = BankCallback(
        request_id=str(view.id),
        status=status,  # type: ignore[arg-type]
        amount_minor=view.amount_minor,
        currency=view.currency,
        bank_reference="CARD-1",
    )
    outcome = await run_step(
        engine,
        settle(channel=view.channel, callback=callback),
        answer_type=CallbackAnswer,
        scope="p1",
        idempotency=None,
    )
    assert outcome.value is not None, outcome.refusal
    return outcome.value


async def _consistent(engine: Engine) -> None:
    async with engine.pool.acquire() as conn:
        assert [o for o in await reconcile(conn) if o.violations] == []


def test_the_sweeper_runs_the_deadline() -> None:
    assert TIME_OUT in TIMER_JOBS


async def test_a_withdrawal_beyond_the_balance_opens_nothing(dsn: str) -> None:
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG)
    try:
        user = await _funded_user(engine, 100)
        step = open_request(
            kind=Direction.WITHDRAWAL, channel=_channel(), account_id=user, amount_minor=101,
            currency="CNY", destination="62220202", notify_url=None, metadata={},
        )  # fmt: skip
        outcome = await run_step(
            engine, step, answer_type=ChannelRequestView, scope="p1", idempotency=None
        )
        assert outcome.refusal is not None and outcome.refusal.code == "insufficient_funds"
        async with engine.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM channel_requests") == 0
            assert await conn.fetchval("SELECT count(*) FROM transfers") == 1  # the funding
        # Another partner's account is not found, whatever its balance.
        step = open_request(
            kind=Direction.TOPUP, channel=_channel(), account_id=user, amount_minor=1,
            currency="CNY", destination=None, notify_url=None, metadata={},
        )  # fmt: skip
        other = await run_step(
            engine, step, answer_type=ChannelRequestView, scope="p2", idempotency=None
        )
        assert other.refusal is not None and other.refusal.code == "account_not_found"
    finally:
        await engine.close()


async def test_the_deadline_and_a_callback_racing_resolve_once(dsn: str) -> None:
    clock = Clock()
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        user = await _funded_user(engine, 10_000)
        views = [await _open(engine, user, Direction.WITHDRAWAL, 100) for _ in range(10)]
        clock.now += timedelta(minutes=10)  # the card channel's deadline
        results = await asyncio.gather(
            time_out_once(engine, now=clock.now, limit=100),
            *(_settle(engine, view, "succeeded") for view in views),
        )
        timed_out, answers = results[0], results[1:]
        applied = [a for a in answers if a.outcome is CallbackOutcome.APPLIED]  # type: ignore[union-attr]
        late = [a for a in answers if a.outcome is CallbackOutcome.LATE]  # type: ignore[union-attr]
        assert len(applied) + timed_out == 10 and len(late) == timed_out
        account = await engine.account(user, scope="p1")
        assert account is not None
        assert account.posted_minor == 10_000 - 100 * len(applied)
        assert account.debits_pending_minor == 0
        await _consistent(engine)
    finally:
        await engine.close()


async def test_a_restart_loses_no_deadline_and_fires_none_twice(dsn: str) -> None:
    clock = Clock()
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    user = await _funded_user(engine, 1_000)
    topup = await _open(engine, user, Direction.TOPUP, 300)
    withdrawal = await _open(engine, user, Direction.WITHDRAWAL, 400)
    await engine.close()
    clock.now += timedelta(minutes=10)
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        assert await time_out_once(engine, now=clock.now, limit=1) == 1  # bounded batches
        assert await time_out_once(engine, now=clock.now, limit=1) == 1
        assert await time_out_once(engine, now=clock.now, limit=1) == 0
        for view in (topup, withdrawal):
            answer = await _settle(engine, view, "succeeded")
            assert answer.outcome is CallbackOutcome.LATE
            assert answer.request.state is RequestState.TIMED_OUT
        account = await engine.account(user, scope="p1")
        assert account is not None and account.posted_minor == 1_000
        assert account.pending_minor == 0 and account.debits_pending_minor == 0
        async with engine.pool.acquire() as conn:
            events = await conn.fetch("SELECT type FROM outbox_events ORDER BY id")
        assert sorted(r["type"] for r in events) == ["topup.timed_out", "withdrawal.timed_out"]
        await _consistent(engine)
    finally:
        await engine.close()
