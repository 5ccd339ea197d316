"""Daily statements at the engine: a UTC day's posted movements, in bounded chunks, whose
deltas sum to the day's change of the posted balance."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest

from engine import (
    AccountKind,
    CreateAccount,
    CreateTransfers,
    Engine,
    PostPending,
    TransferSpec,
    VoidPending,
)
from engine.products.statements import StatementLine, open_statement
from tests.conftest import TEST_ENGINE_CONFIG

DAY = date(2026, 3, 2)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def engine(dsn: str, clock: Clock) -> AsyncIterator[Engine]:
    opened = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


async def _open(engine: Engine, kind: AccountKind, scope: str = "p1") -> int:
    result = await engine.submit(CreateAccount(currency="CNY", kind=kind, scope=scope))
    assert result.account is not None
    return result.account.id


async def _move(engine: Engine, debit: int, credit: int, amount: int, **fields: object) -> int:
    spec = TransferSpec(
        debit_account_id=debit,
        credit_account_id=credit,
        amount_minor=amount,
        currency="CNY",
        **fields,  # type: ignore[arg-type]
    )
    result = await engine.submit(CreateTransfers(transfers=(spec,)))
    assert result.ok, result
    return result.transfers[0].id


async def _posted(engine: Engine, account_id: int) -> int:
    account = await engine.account(account_id, scope=None)
    assert account is not None
    return account.posted_minor


async def _statement(
    engine: Engine, account_id: int, day: date, *, scope: str = "p1", chunk_rows: int = 500
) -> list[list[StatementLine]] | None:
    async with open_statement(
        engine, account_id, scope=scope, day=day, chunk_rows=chunk_rows
    ) as found:
        if found is None:
            return None
        return [chunk async for chunk in found.chunks()]


async def test_a_days_lines_sum_to_its_balance_change_in_bounded_chunks(
    engine: Engine, clock: Clock
) -> None:
    bank = await _open(engine, AccountKind.SYSTEM)
    merchant = await _open(engine, AccountKind.MERCHANT)
    buyer = await _open(engine, AccountKind.USER)
    await _move(engine, bank, buyer, 100_000)
    await _move(engine, buyer, merchant, 1_000)  # the day before, at 23:59:59
    before = await _posted(engine, merchant)

    clock.now = datetime.combine(DAY, datetime.min.time(), tzinfo=UTC)  # 00:00:00 exactly
    for amount in (100, 200, 300):
        await _move(engine, buyer, merchant, amount, metadata={"out_trade_no": f"T{amount}"})
    await _move(engine, merchant, buyer, 50)  # a refund: money out
    hold = await _move(engine, buyer, merchant, 400, pending=True)
    assert (await engine.submit(PostPending(transfer_id=hold, amount_minor=250))).ok
    voided = await _move(engine, buyer, merchant, 999, pending=True)
    assert (await engine.submit(VoidPending(transfer_id=voided))).ok
    clock.now += timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999)
    await _move(engine, buyer, merchant, 7)
    after = await _posted(engine, merchant)
    clock.now += timedelta(microseconds=1)  # the next day
    await _move(engine, buyer, merchant, 10_000)

    chunks = await _statement(engine, merchant, DAY, chunk_rows=2)
    assert chunks is not None
    assert [len(c) for c in chunks] == [2, 2, 2]
    lines = [line for chunk in chunks for line in chunk]
    assert sum(line.posted_delta_minor for line in lines) == after - before == 807
    assert [line.posted_delta_minor for line in lines] == [100, 200, 300, -50, 250, 7]
    assert lines[0].posted_after_minor - lines[0].posted_delta_minor == before
    assert lines[-1].posted_after_minor == after
    running = before
    for line in lines:
        running += line.posted_delta_minor
        assert line.posted_after_minor == running
        assert line.counterparty_account_id == buyer and line.currency == "CNY"
    assert [line.out_trade_no for line in lines[:3]] == ["T100", "T200", "T300"]
    assert lines[4].kind == "post" and lines[4].transfer_id == hold
    assert {line.created_at.date() for line in lines} == {DAY}

    # The buyer's statement of the same day mirrors the merchant's.
    buyer_chunks = await _statement(engine, buyer, DAY)
    assert buyer_chunks is not None
    assert sum(line.posted_delta_minor for line in buyer_chunks[0]) == -807


async def test_an_empty_day_and_someone_elses_account(engine: Engine) -> None:
    merchant = await _open(engine, AccountKind.MERCHANT)
    assert await _statement(engine, merchant, date(2025, 6, 1)) == []
    assert await _statement(engine, merchant, DAY, scope="p2") is None
    assert await _statement(engine, 12345, DAY) is None
