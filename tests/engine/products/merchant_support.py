"""What the merchant-payment tests share: an engine on a hand-moved clock, a payer with
money, a merchant with a fee rate, and a snapshot of everything a refusal must leave."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from engine import AccountKind, CreateAccount, CreateTransfers, Engine, Idempotency, TransferSpec
from engine.products import Outcome, Step, run_step
from engine.products.fees import set_rate_bp
from tests.conftest import TEST_ENGINE_CONFIG

T = TypeVar("T")
SCOPE = "public"
FEE_RATE_BP = 60  # 0.6 %
PAYER_FUNDS_MINOR = 100_000
_keys = (f"key-{n}" for n in itertools.count())


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclasses.dataclass
class Shop:
    engine: Engine
    clock: Clock
    dsn: str
    payer: int  # a user with PAYER_FUNDS_MINOR CNY
    merchant: int  # a CNY merchant paying FEE_RATE_BP
    dollars: int  # a USD user account with money
    bank: int

    async def step(self, fn: Any, answer_type: type[T], key: str | None = "auto") -> Outcome[T]:
        idempotency = None
        if key is not None:
            name = next(_keys) if key == "auto" else key
            idempotency = Idempotency(scope=SCOPE, key=name, fingerprint=b"f")
        return await run_step(
            self.engine, fn, answer_type=answer_type, scope=SCOPE, idempotency=idempotency
        )

    async def ok(self, fn: Any, answer_type: type[T]) -> T:
        outcome = await self.step(fn, answer_type)
        assert outcome.refusal is None, outcome.refusal
        assert outcome.value is not None
        return outcome.value

    async def refused(self, fn: Any, answer_type: type[Any], code: str) -> dict[str, Any]:
        """Run a step that must be refused with `code` and change nothing."""
        before = await self.snapshot()
        outcome = await self.step(fn, answer_type)
        assert outcome.refusal is not None, outcome.value
        assert outcome.refusal.code == code, outcome.refusal
        assert await self.snapshot() == before
        return outcome.refusal.extensions

    async def fund(self, account_id: int, amount: int) -> None:
        await _fund(self.engine, self.bank, account_id, amount, "CNY")

    async def balance(self, account_id: int) -> int:
        account = await self.engine.account(account_id, scope=None)
        assert account is not None
        return account.posted_minor

    async def fees(self, currency: str = "CNY") -> int:
        async with self.engine.pool.acquire() as conn:
            found = await conn.fetchval(
                "SELECT account_id FROM house_accounts WHERE name = 'fees' AND currency = $1",
                currency,
            )
        return 0 if found is None else await self.balance(found)

    async def events(self, event_type: str | None = None) -> list[Any]:
        async with self.engine.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT type, subject_id, payload FROM outbox_events ORDER BY id"
            )
        return [r for r in rows if event_type is None or r["type"] == event_type]

    async def snapshot(self) -> dict[str, Any]:
        """Everything a refused step must leave as it was (its key's record aside)."""
        async with self.engine.pool.acquire() as conn:
            tables = {}
            for table in (
                "accounts",
                "transfers",
                "entries",
                "outbox_events",
                "orders",
                "order_refunds",
                "payment_codes",
                "billers",
                "bill_payments",
            ):
                rows = await conn.fetch(f"SELECT * FROM {table} ORDER BY 1")
                tables[table] = [dict(r) for r in rows]
        return tables


async def _open(engine: Engine, kind: AccountKind, currency: str = "CNY") -> int:
    result = await engine.submit(CreateAccount(currency=currency, kind=kind, scope=SCOPE))
    assert result.account is not None
    return result.account.id


async def _fund(engine: Engine, bank: int, to: int, amount: int, currency: str) -> None:
    spec = TransferSpec(
        debit_account_id=bank, credit_account_id=to, amount_minor=amount, currency=currency
    )
    assert (await engine.submit(CreateTransfers(transfers=(spec,)))).ok


async def open_shop(engine: Engine, clock: Clock, dsn: str) -> Shop:
    bank = await _open(engine, AccountKind.SYSTEM)
    usd_bank = await _open(engine, AccountKind.SYSTEM, "USD")
    payer = await _open(engine, AccountKind.USER)
    merchant = await _open(engine, AccountKind.MERCHANT)
    dollars = await _open(engine, AccountKind.USER, "USD")
    await _fund(engine, bank, payer, PAYER_FUNDS_MINOR, "CNY")
    await _fund(engine, usd_bank, dollars, PAYER_FUNDS_MINOR, "USD")

    async def set_fee(step: Step) -> bool:
        await set_rate_bp(step.conn, merchant, FEE_RATE_BP, now=step.now)
        return True

    await run_step(engine, set_fee, answer_type=bool, scope=SCOPE, idempotency=None)
    return Shop(
        engine=engine, clock=clock, dsn=dsn, payer=payer, merchant=merchant, dollars=dollars,
        bank=bank,
    )  # fmt: skip


async def reopen(shop: Shop) -> None:
    """A restart: close the engine, open a new one on the same database and clock."""
    await shop.engine.close()
    shop.engine = await Engine.open(shop.dsn, config=TEST_ENGINE_CONFIG, clock=shop.clock)


@pytest.fixture
async def shop(dsn: str) -> AsyncIterator[Shop]:
    clock = Clock()
    engine = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    opened = await open_shop(engine, clock, dsn)
    try:
        yield opened
    finally:
        await opened.engine.close()
