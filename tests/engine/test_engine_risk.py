"""Risk rules on a real PostgreSQL: settings through engine.risk_settings, counters exact
across two engines, UTC day and minute boundaries on a hand-moved clock, refusals recorded
in the batch that refused, and step-up challenges confirmed exactly once."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import asyncpg

from engine import (
    AccountKind,
    ConfirmStepUp,
    CreateTransfers,
    Engine,
    EngineConfig,
    LaneConfig,
    ResultCode,
    VoidPending,
    risk_settings,
)
from engine.risk import STEP_UP_TTL_S
from engine.sweeper import reap_step_up_messages_once
from tests.conftest import TEST_ENGINE_CONFIG
from tests.engine.test_engine import SCOPE, Clock, funded_pair, key, move, transfer

RICH = 10**9


async def set_kind(engine: Engine, kind: AccountKind, **limits: int | None) -> None:
    async with engine.pool.acquire() as conn:
        await risk_settings.set_kind_rules(conn, kind, limits, now=engine.clock())


async def set_account(engine: Engine, account_id: int, **limits: int | None) -> None:
    async with engine.pool.acquire() as conn:
        assert await risk_settings.set_account_rules(conn, account_id, limits) is not None


async def risk_row(engine: Engine, account_id: int) -> asyncpg.Record:
    async with engine.pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT debits_posted, debits_pending, risk_counted_minute,
                      risk_outflow_day_minor, risk_transfers_minute,
                      (SELECT count(*) FROM risk_refusals r WHERE r.account_id = a.id) AS refusals
               FROM accounts a WHERE id = $1""",
            account_id,
        )
    assert row is not None
    return row


async def test_two_engines_never_send_more_than_the_daily_limit(dsn: str) -> None:
    config = EngineConfig(lanes=2, lane=LaneConfig(batch_size_max=20), read_pool_size_max=2)
    first = await Engine.open(dsn, config=config)
    second = await Engine.open(dsn, config=config)
    try:
        _, user, merchant = await funded_pair(first, RICH)
        await set_kind(first, AccountKind.USER, daily_outflow_max_minor=1000)  # a kind default
        results = await asyncio.gather(
            *(move(engine, user, merchant, 7) for engine in (first, second) for _ in range(100))
        )
        accepted = [r for r in results if r.ok]
        refused = {r.code for r in results if not r.ok}
        assert len(accepted) == 1000 // 7  # exact: not one more, not one fewer
        assert refused == {ResultCode.RISK_DAILY_OUTFLOW_LIMIT}
        row = await risk_row(first, user)
        assert row["debits_posted"] == row["risk_outflow_day_minor"] == 7 * (1000 // 7)
        assert row["refusals"] == 200 - 1000 // 7
    finally:
        await first.close()
        await second.close()


async def test_two_engines_never_pass_the_velocity_limit(dsn: str) -> None:
    clock = Clock()  # one minute for the whole test
    clock.now = clock.now.replace(second=0)
    first = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    second = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        _, user, merchant = await funded_pair(first, RICH)
        await set_account(first, user, velocity_max_per_minute=30)
        results = await asyncio.gather(
            *(move(engine, user, merchant, 1) for engine in (first, second) for _ in range(40))
        )
        assert sum(r.ok for r in results) == 30
        assert {r.code for r in results if not r.ok} == {ResultCode.RISK_VELOCITY_LIMIT}
        assert all(r.retry_after_s == 60 for r in results if not r.ok)
        clock.advance(60)
        assert (await move(first, user, merchant, 1)).ok
        assert (await risk_row(first, user))["risk_transfers_minute"] == 1
    finally:
        await first.close()
        await second.close()


async def test_the_daily_limit_starts_again_at_midnight_utc(dsn: str) -> None:
    clock = Clock()
    clock.now = datetime(2026, 1, 31, 23, 59, 50, tzinfo=UTC)
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        _, user, merchant = await funded_pair(engine, RICH)
        await set_account(engine, user, daily_outflow_max_minor=100)
        assert (await move(engine, user, merchant, 100)).ok
        refused = await move(engine, user, merchant, 1)
        assert (refused.code, refused.retry_after_s) == (ResultCode.RISK_DAILY_OUTFLOW_LIMIT, 10)
        clock.advance(10)  # 00:00:00 UTC
        assert (await move(engine, user, merchant, 100)).ok
        assert (await move(engine, user, merchant, 1)).code is ResultCode.RISK_DAILY_OUTFLOW_LIMIT
    finally:
        await engine.close()


async def test_account_overrides_beat_kind_defaults_and_freezing_is_immediate(
    engine: Engine,
) -> None:
    bank, user, merchant = await funded_pair(engine, RICH)
    other = await move(engine, bank, user, 1)  # the bank is a system account: no rules
    assert other.ok
    await set_kind(engine, AccountKind.USER, max_per_transfer_minor=50)
    await set_account(engine, user, max_per_transfer_minor=500)
    assert (await move(engine, user, merchant, 400)).ok
    _, capped, _ = await funded_pair(engine, RICH)
    refused = await move(engine, capped, merchant, 51)
    assert refused.code is ResultCode.RISK_TRANSFER_LIMIT and refused.retry_after_s is None
    await set_account(engine, user, max_per_transfer_minor=None)  # inherit again
    assert (await move(engine, user, merchant, 51)).code is ResultCode.RISK_TRANSFER_LIMIT
    async with engine.pool.acquire() as conn:
        await risk_settings.set_frozen(conn, merchant, frozen=True)
    assert (await move(engine, user, merchant, 1)).code is ResultCode.ACCOUNT_FROZEN
    async with engine.pool.acquire() as conn:
        await risk_settings.set_frozen(conn, merchant, frozen=False)
    assert (await move(engine, user, merchant, 1)).ok


async def test_refusals_are_recorded_with_their_request_and_replayed(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, RICH)
    await set_account(engine, user, daily_outflow_max_minor=10)
    request = key("too-much")
    first = await move(engine, user, merchant, 11, idempotency=request)
    again = await move(engine, user, merchant, 11, idempotency=request)
    assert first.code is again.code is ResultCode.RISK_DAILY_OUTFLOW_LIMIT
    assert again.replayed and again.retry_after_s == first.retry_after_s
    async with engine.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM risk_refusals")
    assert len(rows) == 1  # the replay was not applied again
    (row,) = rows
    assert (row["account_id"], row["code"], row["amount_minor"]) == (
        user,
        "risk_daily_outflow_limit",
        11,
    )
    assert (row["scope"], row["idempotency_key"]) == (SCOPE, "too-much")
    assert "daily outflow limit" in row["reason"]


async def test_a_voided_hold_keeps_its_outflow_counted(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, RICH)
    await set_account(engine, user, daily_outflow_max_minor=100)
    hold = await move(engine, user, merchant, 80, pending=True)
    assert hold.ok
    assert (await engine.submit(VoidPending(transfer_id=hold.transfers[0].id, scope=SCOPE))).ok
    assert (await move(engine, user, merchant, 21)).code is ResultCode.RISK_DAILY_OUTFLOW_LIMIT
    assert (await move(engine, user, merchant, 20)).ok
    row = await risk_row(engine, user)
    assert (row["debits_posted"], row["debits_pending"], row["risk_outflow_day_minor"]) == (
        20,
        0,
        100,
    )


async def test_accounts_without_limits_keep_no_counters(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, RICH)
    await set_kind(engine, AccountKind.MERCHANT, daily_outflow_max_minor=5)  # not the user's kind
    assert (await move(engine, user, merchant, 10)).ok
    row = await risk_row(engine, user)
    assert row["risk_counted_minute"] is None and row["risk_outflow_day_minor"] == 0


async def outbox_code(engine: Engine, challenge_id: int) -> str:
    async with engine.pool.acquire() as conn:
        message = await conn.fetchval(
            "SELECT message FROM step_up_outbox WHERE challenge_id = $1", challenge_id
        )
    match = re.search(r"code is ([0-9]{6})\.", message)
    assert match is not None, message
    return match[1]


async def test_a_step_up_runs_its_transfer_once_after_the_right_code(dsn: str) -> None:
    clock = Clock()
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        _, user, merchant = await funded_pair(engine, RICH)
        await set_account(engine, user, step_up_threshold_minor=1000)
        request = key("big")
        held = await move(engine, user, merchant, 5000, idempotency=request)
        assert held.code is ResultCode.STEP_UP_REQUIRED and held.step_up is not None
        assert held.step_up.expires_at == clock.now + timedelta(seconds=STEP_UP_TTL_S)
        replay = await move(engine, user, merchant, 5000, idempotency=request)
        assert replay.replayed and replay.step_up == held.step_up  # one challenge, one code
        challenge_id = held.step_up.id
        code = await outbox_code(engine, challenge_id)
        async with engine.pool.acquire() as conn:
            stored = await conn.fetchrow(
                "SELECT code_hash, status FROM step_up_challenges WHERE id = $1", challenge_id
            )
            sent = await conn.fetchval("SELECT count(*) FROM step_up_outbox")
        assert code.encode() not in bytes(stored["code_hash"]) and stored["status"] == "pending"
        assert sent == 1
        assert (await risk_row(engine, user))["debits_posted"] == 0
        confirm = ConfirmStepUp(challenge_id=challenge_id, code=code, scope=SCOPE)
        done, second = await asyncio.gather(
            engine.submit(confirm, idempotency=key("confirm-1")),
            engine.submit(confirm, idempotency=key("confirm-2")),
        )
        assert sorted([done.code, second.code]) == sorted(
            [ResultCode.OK, ResultCode.STEP_UP_ALREADY_CONFIRMED]
        )
        assert (await risk_row(engine, user))["debits_posted"] == 5000  # once
        again = await engine.submit(confirm, idempotency=key("confirm-1"))
        assert again.replayed and again.code is done.code
        other_scope = ConfirmStepUp(challenge_id=challenge_id, code=code, scope="someone-else")
        assert (await engine.submit(other_scope)).code is ResultCode.STEP_UP_NOT_FOUND
    finally:
        await engine.close()


async def test_a_step_up_group_runs_whole(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, RICH)
    await set_account(engine, user, step_up_threshold_minor=100)
    group = CreateTransfers(
        transfers=(transfer(user, merchant, 50), transfer(user, merchant, 150)),
        linked=True,
        scope=SCOPE,
    )
    held = await engine.submit(group)
    assert held.code is ResultCode.STEP_UP_REQUIRED and held.step_up is not None
    code = await outbox_code(engine, held.step_up.id)
    done = await engine.submit(ConfirmStepUp(challenge_id=held.step_up.id, code=code, scope=SCOPE))
    assert done.ok and [t.amount_minor for t in done.transfers] == [50, 150]
    assert done.transfers[0].group_id is not None


async def test_a_step_up_outlives_its_rule_and_still_expires(dsn: str) -> None:
    """Confirming after the threshold was lifted: a batch with no account rules still
    writes the challenge's fate and the refusal."""
    clock = Clock()
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        _, user, merchant = await funded_pair(engine, RICH)
        await set_account(engine, user, step_up_threshold_minor=0)
        late, wrong = [await move(engine, user, merchant, 5) for _ in range(2)]
        assert late.step_up is not None and wrong.step_up is not None
        await set_account(engine, user, step_up_threshold_minor=None)
        code = await outbox_code(engine, wrong.step_up.id)
        bad = f"{(int(code) + 1) % 1_000_000:06d}"
        refused = await engine.submit(
            ConfirmStepUp(challenge_id=wrong.step_up.id, code=bad, scope=SCOPE)
        )
        assert (refused.code, refused.attempts_left) == (ResultCode.STEP_UP_CODE_INVALID, 4)
        clock.advance(STEP_UP_TTL_S)
        code = await outbox_code(engine, late.step_up.id)
        expired = await engine.submit(
            ConfirmStepUp(challenge_id=late.step_up.id, code=code, scope=SCOPE)
        )
        assert expired.code is ResultCode.STEP_UP_EXPIRED
        async with engine.pool.acquire() as conn:
            codes = await conn.fetch("SELECT code FROM risk_refusals ORDER BY id")
            attempts = await conn.fetchval(
                "SELECT attempts FROM step_up_challenges WHERE id = $1", wrong.step_up.id
            )
        assert [r["code"] for r in codes] == ["step_up_code_invalid", "step_up_expired"]
        assert attempts == 1
        assert (await risk_row(engine, user))["debits_posted"] == 0
    finally:
        await engine.close()


async def test_the_sweeper_deletes_codes_once_spent_or_expired(dsn: str) -> None:
    clock = Clock()
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        _, user, merchant = await funded_pair(engine, RICH)
        await set_account(engine, user, step_up_threshold_minor=0)
        used, waiting = [(await move(engine, user, merchant, 5)).step_up for _ in range(2)]
        assert used is not None and waiting is not None
        assert await reap_step_up_messages_once(engine, limit=10) == 0  # both still usable
        code = await outbox_code(engine, used.id)
        assert (await engine.submit(ConfirmStepUp(challenge_id=used.id, code=code))).ok
        assert await reap_step_up_messages_once(engine, limit=10) == 1  # spent
        await outbox_code(engine, waiting.id)  # still there: it may still be confirmed
        clock.advance(STEP_UP_TTL_S)
        assert await reap_step_up_messages_once(engine, limit=10) == 1  # expired
        async with engine.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM step_up_outbox") == 0
            assert await conn.fetchval("SELECT count(*) FROM step_up_challenges") == 2
    finally:
        await engine.close()
