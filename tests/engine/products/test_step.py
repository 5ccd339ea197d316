"""Product steps: one transaction per idempotent operation, refusals that change nothing,
answers replayed, house accounts opened once, events written with their state."""

from __future__ import annotations

import asyncio

import msgspec

from engine import (
    AccountKind,
    CreateAccount,
    CreateTransfers,
    Engine,
    Idempotency,
    ResultCode,
    TransferSpec,
    risk_settings,
)
from engine.products import Refusal, Step, run_step


class Moved(msgspec.Struct, frozen=True):
    transfer_id: int
    event_id: int


async def _open(engine: Engine, kind: AccountKind, scope: str = "p1") -> int:
    result = await engine.submit(CreateAccount(currency="CNY", kind=kind, scope=scope))
    assert result.account is not None
    return result.account.id


def _key(key: str, fingerprint: bytes = b"f1") -> Idempotency:
    return Idempotency(scope="p1", key=key, fingerprint=fingerprint)


async def _counts(engine: Engine) -> tuple[int, int, int]:
    async with engine.pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM transfers) t, (SELECT count(*) FROM entries) e,
                      (SELECT count(*) FROM outbox_events) o"""
        )
    return row["t"], row["e"], row["o"]


def _pay(user: int, *, refuse_after: bool = False):  # type: ignore[no-untyped-def]
    async def step(s: Step) -> Moved:
        bank = await s.house_account("bank.test", "CNY")
        spec = TransferSpec(
            debit_account_id=bank, credit_account_id=user, amount_minor=500, currency="CNY"
        )
        result = await s.move_or_refuse(CreateTransfers(transfers=(spec,)))
        event_id = await s.notify(
            event_type="test.paid", subject_id=user, payload={"n": 1}, notify_url=None
        )
        if refuse_after:
            raise Refusal("trade_state_conflict", "changed my mind", state="X")
        return Moved(transfer_id=result.transfers[0].id, event_id=event_id)

    return step


async def test_a_step_moves_money_records_its_event_and_replays(engine: Engine) -> None:
    user = await _open(engine, AccountKind.USER)
    first = await run_step(engine, _pay(user), answer_type=Moved, scope="p1", idempotency=_key("a"))
    assert first.value is not None and not first.replayed
    again = await run_step(engine, _pay(user), answer_type=Moved, scope="p1", idempotency=_key("a"))
    assert again.replayed and again.value == first.value
    assert (await engine.account(user, scope="p1")).posted_minor == 500  # type: ignore[union-attr]
    assert await _counts(engine) == (1, 2, 1)
    reused = await run_step(
        engine, _pay(user), answer_type=Moved, scope="p1", idempotency=_key("a", b"other")
    )
    assert reused.refusal is not None
    assert reused.refusal.code == ResultCode.IDEMPOTENCY_KEY_REUSED
    assert await _counts(engine) == (1, 2, 1)


async def test_a_refusal_changes_nothing_and_is_replayed(engine: Engine) -> None:
    user = await _open(engine, AccountKind.USER)
    step = _pay(user, refuse_after=True)
    first = await run_step(engine, step, answer_type=Moved, scope="p1", idempotency=_key("r"))
    assert first.value is None and first.refusal is not None
    assert first.refusal.code == "trade_state_conflict"
    assert first.refusal.extensions == {"state": "X"}
    assert await _counts(engine) == (0, 0, 0)
    assert (await engine.account(user, scope="p1")).posted_minor == 0  # type: ignore[union-attr]
    again = await run_step(engine, step, answer_type=Moved, scope="p1", idempotency=_key("r"))
    assert again.replayed and again.refusal == first.refusal


async def test_a_ledger_failure_refuses_the_step(engine: Engine) -> None:
    user = await _open(engine, AccountKind.USER)
    merchant = await _open(engine, AccountKind.MERCHANT)

    async def overspend(s: Step) -> Moved:
        spec = TransferSpec(
            debit_account_id=user, credit_account_id=merchant, amount_minor=1, currency="CNY"
        )
        await s.move_or_refuse(CreateTransfers(transfers=(spec,), scope=s.scope))
        raise AssertionError("not reached")

    outcome = await run_step(engine, overspend, answer_type=Moved, scope="p1", idempotency=None)
    assert outcome.refusal is not None
    assert outcome.refusal.code == ResultCode.INSUFFICIENT_FUNDS


async def test_concurrent_steps_open_one_house_account_and_apply_a_key_once(
    engine: Engine,
) -> None:
    user = await _open(engine, AccountKind.USER)
    outcomes = await asyncio.gather(
        *(
            run_step(engine, _pay(user), answer_type=Moved, scope="p1", idempotency=_key(k))
            for k in ("k1", "k2", "k1", "k1", "k3")
        )
    )
    assert all(o.value is not None for o in outcomes)
    assert [o.replayed for o in outcomes].count(False) == 3
    assert len({o.value for o in outcomes}) == 3
    async with engine.pool.acquire() as conn:
        houses = await conn.fetchval("SELECT count(*) FROM accounts WHERE scope = 'house'")
    assert houses == 1
    assert (await engine.account(user, scope="p1")).posted_minor == 1500  # type: ignore[union-attr]


async def test_someone_elses_account_is_not_found(engine: Engine) -> None:
    theirs = await _open(engine, AccountKind.USER, scope="p2")

    async def read(s: Step) -> Moved:
        if await s.account(theirs) is None:
            raise Refusal("account_not_found", "no such account")
        return Moved(transfer_id=0, event_id=0)

    outcome = await run_step(engine, read, answer_type=Moved, scope="p1", idempotency=None)
    assert outcome.refusal is not None and outcome.refusal.code == "account_not_found"


async def test_risk_rules_hold_inside_a_step_and_a_step_up_refuses_cleanly(engine: Engine) -> None:
    user = await _open(engine, AccountKind.USER)
    merchant = await _open(engine, AccountKind.MERCHANT)
    first = await run_step(engine, _pay(user), answer_type=Moved, scope="p1", idempotency=None)
    assert first.value is not None  # the user holds 500

    async def spend(s: Step) -> Moved:
        spec = TransferSpec(
            debit_account_id=user, credit_account_id=merchant, amount_minor=300, currency="CNY"
        )
        result = await s.move_or_refuse(CreateTransfers(transfers=(spec,), scope=s.scope))
        return Moved(transfer_id=result.transfers[0].id, event_id=0)

    async with engine.pool.acquire() as conn:
        assert await risk_settings.set_account_rules(conn, user, {"step_up_threshold_minor": 200})
    refused = await run_step(engine, spend, answer_type=Moved, scope="p1", idempotency=None)
    assert refused.refusal is not None and refused.refusal.code == "step_up_required"
    async with engine.pool.acquire() as conn:
        challenges = await conn.fetchval("SELECT count(*) FROM step_up_challenges")
        assert challenges == 0  # rolled back with the step: no code sent for it
        await risk_settings.set_frozen(conn, user, frozen=True)
    frozen = await run_step(engine, spend, answer_type=Moved, scope="p1", idempotency=None)
    assert frozen.refusal is not None and frozen.refusal.code == ResultCode.ACCOUNT_FROZEN
    assert (await engine.account(user, scope="p1")).posted_minor == 500  # type: ignore[union-attr]
