"""The engine against a real PostgreSQL: accounts, transfers, holds, idempotency, expiry,
paging, reconciliation, and concurrency within one process and across two.

Every test gets a fresh migrated database (`dsn`) and, unless it needs its own clock or
configuration, the shared test Engine (`engine`) from tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from engine import (
    AccountKind,
    AccountView,
    Command,
    CreateAccount,
    CreateTransfers,
    Engine,
    EngineConfig,
    EntryKind,
    Idempotency,
    IdempotencyKeyInFlight,
    InvalidCommand,
    InvalidCursor,
    LaneConfig,
    Overloaded,
    PostPending,
    Result,
    ResultCode,
    RetryableError,
    TransferSpec,
    TransferStatus,
    VoidPending,
    store,
)
from engine.reconcile import reconcile
from engine.sweeper import expire_holds_once, reap_keys_once
from tests.conftest import TEST_ENGINE_CONFIG

SCOPE = "partner-a"
UNKNOWN_ID = 12345  # ids carry a timestamp, so no id this small is ever issued
_keys = (f"key-{n}" for n in itertools.count())


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def key(name: str | None = None, *, body: str = "body", scope: str = SCOPE) -> Idempotency:
    return Idempotency(
        scope=scope,
        key=name or next(_keys),
        fingerprint=hashlib.sha256(body.encode()).digest(),
    )


async def new_account(
    engine: Engine,
    kind: AccountKind = AccountKind.USER,
    *,
    currency: str = "CNY",
    scope: str | None = SCOPE,
) -> int:
    result = await engine.submit(CreateAccount(currency=currency, kind=kind, scope=scope))
    assert result.ok, result
    assert result.account is not None
    return result.account.id


def transfer(
    debit: int,
    credit: int,
    amount: int,
    *,
    pending: bool = False,
    timeout_s: int | None = None,
    currency: str = "CNY",
) -> TransferSpec:
    return TransferSpec(
        debit_account_id=debit,
        credit_account_id=credit,
        amount_minor=amount,
        currency=currency,
        pending=pending,
        timeout_s=timeout_s,
    )


async def move(
    engine: Engine,
    debit: int,
    credit: int,
    amount: int,
    *,
    idempotency: Idempotency | None = None,
    **spec: object,
) -> Result:
    command = CreateTransfers(
        transfers=(transfer(debit, credit, amount, **spec),),  # type: ignore[arg-type]
        scope=SCOPE,
    )
    return await engine.submit(command, idempotency=idempotency)


async def account(engine: Engine, account_id: int) -> AccountView:
    view = await engine.account(account_id, scope=SCOPE)
    assert view is not None
    return view


async def funded_pair(engine: Engine, amount: int) -> tuple[int, int, int]:
    """A system (bank) account, a user holding `amount`, and an empty merchant."""
    bank = await new_account(engine, AccountKind.SYSTEM)
    user = await new_account(engine, AccountKind.USER)
    merchant = await new_account(engine, AccountKind.MERCHANT)
    assert (await move(engine, bank, user, amount)).ok
    return bank, user, merchant


async def assert_reconciles(engine: Engine) -> None:
    async with engine.pool.acquire() as conn:
        outcomes = await reconcile(conn)
    broken = [o for o in outcomes if o.violations]
    assert not broken, broken


@pytest.fixture
async def clock() -> Clock:
    return Clock()


@pytest.fixture
async def clocked(dsn: str, clock: Clock) -> AsyncIterator[Engine]:
    """An engine whose time is `clock`, keeping idempotency keys for one hour."""
    config = EngineConfig(
        lanes=2,
        lane=TEST_ENGINE_CONFIG.lane,
        read_pool_size_max=4,
        idempotency_retention_s=3600,
    )
    opened = await Engine.open(dsn, config=config, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


# -- accounts and transfers ----------------------------------------------------------------


async def test_create_account(engine: Engine) -> None:
    result = await engine.submit(
        CreateAccount(currency="CNY", kind=AccountKind.USER, metadata={"owner": "u-1"}, scope=SCOPE)
    )
    assert result.ok and not result.replayed
    created = result.account
    assert created is not None
    assert created.currency == "CNY" and created.kind is AccountKind.USER
    assert not created.overdraft_allowed
    assert created.posted_minor == created.pending_minor == created.available_minor == 0

    read = await account(engine, created.id)
    assert read.metadata == {"owner": "u-1"}
    assert read.debits_posted_minor == read.credits_posted_minor == 0
    assert read.created_at == created.created_at

    system = await engine.submit(CreateAccount(currency="USD", kind=AccountKind.SYSTEM))
    assert system.account is not None and system.account.overdraft_allowed

    # An account is visible to its own scope and the operator only.
    assert await engine.account(created.id, scope="someone-else") is None
    assert await engine.account(created.id, scope=None) is not None
    assert await engine.account(UNKNOWN_ID, scope=SCOPE) is None


async def test_immediate_transfer_moves_posted_balances(engine: Engine) -> None:
    bank, user, merchant = await funded_pair(engine, 10_000)
    result = await move(engine, user, merchant, 2_500)
    assert result.ok
    (made,) = result.transfers
    assert made.status is TransferStatus.POSTED and not made.pending
    assert made.amount_minor == made.posted_amount_minor == 2_500
    assert made.group_id is None and made.expires_at is None

    assert (await account(engine, bank)).posted_minor == -10_000
    assert (await account(engine, user)).posted_minor == 7_500
    assert (await account(engine, merchant)).posted_minor == 2_500

    read = await engine.transfer(made.id, scope=SCOPE)
    assert read is not None and read.amount_minor == 2_500 and read.status is TransferStatus.POSTED
    assert await engine.transfer(made.id, scope="someone-else") is None
    await assert_reconciles(engine)


async def test_failed_transfers_change_nothing(engine: Engine) -> None:
    bank, user, merchant = await funded_pair(engine, 100)
    dollars = await new_account(engine, currency="USD")

    assert (await move(engine, user, merchant, 101)).code is ResultCode.INSUFFICIENT_FUNDS
    assert (await move(engine, user, dollars, 1)).code is ResultCode.CURRENCY_MISMATCH
    unknown = await move(engine, user, UNKNOWN_ID, 1)
    assert unknown.code is ResultCode.ACCOUNT_NOT_FOUND
    assert (await move(engine, user, user, 1)).code is ResultCode.ACCOUNTS_MUST_DIFFER
    # Another scope's accounts do not exist for this one.
    stranger = await new_account(engine, scope="someone-else")
    assert (await move(engine, user, stranger, 1)).code is ResultCode.ACCOUNT_NOT_FOUND

    assert (await account(engine, user)).posted_minor == 100
    assert (await account(engine, merchant)).posted_minor == 0
    assert (await account(engine, bank)).posted_minor == -100
    async with engine.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM transfers") == 1
    await assert_reconciles(engine)


# -- idempotency ---------------------------------------------------------------------------


async def test_same_key_and_fingerprint_replays_first_result(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    k = key()
    first = await move(engine, user, merchant, 300, idempotency=k)
    second = await move(engine, user, merchant, 300, idempotency=k)
    assert first.ok and not first.replayed
    assert second.ok and second.replayed
    assert second.transfers == first.transfers
    assert (await account(engine, user)).posted_minor == 700
    assert (await account(engine, merchant)).posted_minor == 300

    # Account creation replays too: no second account.
    k_account = key()
    opened = await engine.submit(
        CreateAccount(currency="CNY", kind=AccountKind.USER, scope=SCOPE), idempotency=k_account
    )
    again = await engine.submit(
        CreateAccount(currency="CNY", kind=AccountKind.USER, scope=SCOPE), idempotency=k_account
    )
    assert again.replayed and again.account == opened.account


async def test_stored_failure_replays_even_after_funds_arrive(engine: Engine) -> None:
    bank = await new_account(engine, AccountKind.SYSTEM)
    user = await new_account(engine)
    merchant = await new_account(engine, AccountKind.MERCHANT)
    k = key()
    refused = await move(engine, user, merchant, 500, idempotency=k)
    assert refused.code is ResultCode.INSUFFICIENT_FUNDS and not refused.replayed

    assert (await move(engine, bank, user, 1_000)).ok
    replay = await move(engine, user, merchant, 500, idempotency=k)
    assert replay.code is ResultCode.INSUFFICIENT_FUNDS
    assert replay.replayed and replay.detail == refused.detail
    assert (await account(engine, user)).posted_minor == 1_000
    assert (await account(engine, merchant)).posted_minor == 0

    # A new key is a new request, and now it succeeds.
    assert (await move(engine, user, merchant, 500, idempotency=key())).ok


async def test_same_key_other_fingerprint_is_refused(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    first = await move(engine, user, merchant, 100, idempotency=key("k1", body="a"))
    assert first.ok
    reused = await move(engine, user, merchant, 200, idempotency=key("k1", body="b"))
    assert reused.code is ResultCode.IDEMPOTENCY_KEY_REUSED
    assert not reused.transfers
    assert (await account(engine, user)).posted_minor == 900

    # Keys are per scope: another caller may use the same key for its own request.
    other = await move(engine, user, merchant, 200, idempotency=key("k1", body="b", scope="x"))
    assert other.ok and not other.replayed
    assert (await account(engine, user)).posted_minor == 700


async def test_same_key_concurrently_is_in_flight(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    k = key()
    first, second = await asyncio.gather(
        move(engine, user, merchant, 100, idempotency=k),
        move(engine, user, merchant, 100, idempotency=k),
        return_exceptions=True,
    )
    assert isinstance(first, Result) and first.ok and not first.replayed
    assert isinstance(second, IdempotencyKeyInFlight)
    assert isinstance(second, RetryableError)

    # Once the first is answered, the key replays its answer.
    retried = await move(engine, user, merchant, 100, idempotency=k)
    assert retried.replayed and retried.transfers == first.transfers
    assert (await account(engine, user)).posted_minor == 900


async def test_hundred_concurrent_keyed_submissions_all_land(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 100_000)
    results = await asyncio.gather(
        *(move(engine, user, merchant, n, idempotency=key()) for n in range(1, 101))
    )
    assert all(r.ok and not r.replayed for r in results)
    assert len({r.transfers[0].id for r in results}) == 100
    moved = sum(range(1, 101))
    assert (await account(engine, user)).posted_minor == 100_000 - moved
    assert (await account(engine, merchant)).posted_minor == moved
    async with engine.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 100
    await assert_reconciles(engine)


# -- holds ---------------------------------------------------------------------------------


async def hold(engine: Engine, debit: int, credit: int, amount: int, **spec: object) -> int:
    result = await move(engine, debit, credit, amount, pending=True, **spec)
    assert result.ok, result
    (made,) = result.transfers
    assert made.status is TransferStatus.PENDING and made.pending
    assert made.posted_amount_minor == 0
    return made.id


async def test_hold_reserves_then_posts_in_full(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    hold_id = await hold(engine, user, merchant, 400)

    held = await account(engine, user)
    assert held.posted_minor == 1_000 and held.debits_pending_minor == 400
    assert held.available_minor == 600
    incoming = await account(engine, merchant)
    assert incoming.credits_pending_minor == 400 and incoming.available_minor == 0
    # The reserved money cannot be spent twice.
    assert (await move(engine, user, merchant, 601)).code is ResultCode.INSUFFICIENT_FUNDS

    posted = await engine.submit(PostPending(transfer_id=hold_id, scope=SCOPE))
    assert posted.ok
    (view,) = posted.transfers
    assert view.status is TransferStatus.POSTED and view.posted_amount_minor == 400
    assert view.resolved_at is not None
    user_after = await account(engine, user)
    assert user_after.posted_minor == 600 and user_after.debits_pending_minor == 0
    merchant_after = await account(engine, merchant)
    assert merchant_after.posted_minor == 400 and merchant_after.credits_pending_minor == 0
    await assert_reconciles(engine)


async def test_hold_posts_in_part_and_releases_the_rest(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    hold_id = await hold(engine, user, merchant, 400)

    too_much = await engine.submit(PostPending(transfer_id=hold_id, amount_minor=401, scope=SCOPE))
    assert too_much.code is ResultCode.POST_AMOUNT_EXCEEDS_PENDING

    posted = await engine.submit(PostPending(transfer_id=hold_id, amount_minor=150, scope=SCOPE))
    assert posted.ok and posted.transfers[0].posted_amount_minor == 150
    user_after = await account(engine, user)
    assert user_after.posted_minor == 850 and user_after.available_minor == 850
    assert (await account(engine, merchant)).posted_minor == 150
    read = await engine.transfer(hold_id, scope=SCOPE)
    assert read is not None and read.status is TransferStatus.POSTED
    assert read.posted_amount_minor == 150 and read.amount_minor == 400
    await assert_reconciles(engine)


async def test_void_releases_hold_and_second_resolution_is_refused(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    hold_id = await hold(engine, user, merchant, 400)
    voided = await engine.submit(VoidPending(transfer_id=hold_id, scope=SCOPE))
    assert voided.ok and voided.transfers[0].status is TransferStatus.VOIDED
    assert voided.transfers[0].posted_amount_minor == 0
    user_after = await account(engine, user)
    assert user_after.posted_minor == user_after.available_minor == 1_000
    assert (await account(engine, merchant)).credits_pending_minor == 0

    for again in (
        VoidPending(transfer_id=hold_id, scope=SCOPE),
        PostPending(transfer_id=hold_id, scope=SCOPE),
    ):
        assert (await engine.submit(again)).code is ResultCode.TRANSFER_ALREADY_RESOLVED

    posted_id = await hold(engine, user, merchant, 100)
    assert (await engine.submit(PostPending(transfer_id=posted_id, scope=SCOPE))).ok
    second = await engine.submit(PostPending(transfer_id=posted_id, scope=SCOPE))
    assert second.code is ResultCode.TRANSFER_ALREADY_RESOLVED
    void_after_post = await engine.submit(VoidPending(transfer_id=posted_id, scope=SCOPE))
    assert void_after_post.code is ResultCode.TRANSFER_ALREADY_RESOLVED
    assert (await account(engine, user)).posted_minor == 900

    # Only holds can be resolved, and only holds that exist for the caller.
    immediate = (await move(engine, user, merchant, 1)).transfers[0].id
    not_pending = await engine.submit(PostPending(transfer_id=immediate, scope=SCOPE))
    assert not_pending.code is ResultCode.TRANSFER_NOT_PENDING
    missing = await engine.submit(VoidPending(transfer_id=UNKNOWN_ID, scope=SCOPE))
    assert missing.code is ResultCode.TRANSFER_NOT_FOUND
    hidden = await engine.submit(VoidPending(transfer_id=posted_id, scope="someone-else"))
    assert hidden.code is ResultCode.TRANSFER_NOT_FOUND
    await assert_reconciles(engine)


async def test_concurrent_resolutions_of_one_hold_apply_once(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    hold_id = await hold(engine, user, merchant, 400)
    results = await asyncio.gather(
        *(
            engine.submit(
                PostPending(transfer_id=hold_id, scope=SCOPE)
                if n % 2
                else VoidPending(transfer_id=hold_id, scope=SCOPE)
            )
            for n in range(10)
        )
    )
    assert sum(r.ok for r in results) == 1
    assert all(r.ok or r.code is ResultCode.TRANSFER_ALREADY_RESOLVED for r in results)
    await assert_reconciles(engine)


async def test_sweeper_expires_holds_past_their_timeout(clocked: Engine, clock: Clock) -> None:
    engine = clocked
    _, user, merchant = await funded_pair(engine, 1_000)
    expiring = await hold(engine, user, merchant, 300, timeout_s=60)
    lasting = await hold(engine, user, merchant, 200, timeout_s=3600)
    forever = await hold(engine, user, merchant, 100)
    made = await engine.transfer(expiring, scope=SCOPE)
    assert made is not None and made.expires_at == clock.now + timedelta(seconds=60)

    clock.advance(59)
    assert await expire_holds_once(engine, limit=100) == 0
    assert (await account(engine, user)).available_minor == 400

    clock.advance(2)
    # Past its timeout, a hold cannot be posted or voided, even before the sweeper runs.
    early = await engine.submit(PostPending(transfer_id=expiring, scope=SCOPE))
    assert early.code is ResultCode.PENDING_TRANSFER_EXPIRED
    assert (await account(engine, user)).debits_pending_minor == 600

    assert await expire_holds_once(engine, limit=100) == 1
    assert await expire_holds_once(engine, limit=100) == 0
    expired = await engine.transfer(expiring, scope=SCOPE)
    assert expired is not None and expired.status is TransferStatus.EXPIRED
    assert expired.posted_amount_minor == 0 and expired.resolved_at == clock.now
    user_after = await account(engine, user)
    assert user_after.posted_minor == 1_000 and user_after.debits_pending_minor == 300
    assert (await account(engine, merchant)).credits_pending_minor == 300
    page = await engine.entries(user, scope=SCOPE, limit=1, starting_after=None)
    assert page is not None and page.entries[0].kind is EntryKind.EXPIRE

    # Once expired, it stays expired whatever the caller asks.
    for late in (
        PostPending(transfer_id=expiring, scope=SCOPE),
        VoidPending(transfer_id=expiring, scope=SCOPE),
    ):
        assert (await engine.submit(late)).code is ResultCode.PENDING_TRANSFER_EXPIRED

    # The other holds are untouched and still resolve normally.
    assert (await engine.submit(PostPending(transfer_id=lasting, scope=SCOPE))).ok
    clock.advance(10 * 24 * 3600)
    assert await expire_holds_once(engine, limit=100) == 0
    assert (await engine.submit(VoidPending(transfer_id=forever, scope=SCOPE))).ok
    await assert_reconciles(engine)


async def test_sweeper_expires_a_backlog_in_bounded_batches(clocked: Engine, clock: Clock) -> None:
    engine = clocked
    _, user, merchant = await funded_pair(engine, 1_000)
    for _ in range(5):
        await hold(engine, user, merchant, 10, timeout_s=1)
    clock.advance(1)
    assert await expire_holds_once(engine, limit=2) == 2
    assert await expire_holds_once(engine, limit=2) == 2
    assert await expire_holds_once(engine, limit=2) == 1
    assert (await account(engine, user)).available_minor == 1_000
    await assert_reconciles(engine)


async def test_reaping_removes_only_keys_older_than_retention(
    clocked: Engine, clock: Clock
) -> None:
    engine = clocked
    _, user, merchant = await funded_pair(engine, 1_000)
    old = key("old")
    assert (await move(engine, user, merchant, 1, idempotency=old)).ok
    clock.advance(1800)
    assert (await move(engine, user, merchant, 1, idempotency=key("middle"))).ok
    clock.advance(1801)  # "old" is now older than the hour of retention; "middle" is not
    assert (await move(engine, user, merchant, 1, idempotency=key("new"))).ok

    assert await reap_keys_once(engine, limit=100) == 1
    assert await reap_keys_once(engine, limit=100) == 0
    async with engine.pool.acquire() as conn:
        left = {r["key"] for r in await conn.fetch("SELECT key FROM idempotency_keys")}
    assert left == {"middle", "new"}
    assert (await move(engine, user, merchant, 1, idempotency=key("middle"))).replayed

    clock.advance(3601)
    assert await reap_keys_once(engine, limit=1) == 1
    assert await reap_keys_once(engine, limit=1) == 1
    assert await reap_keys_once(engine, limit=1) == 0
    await assert_reconciles(engine)


# -- linked groups -------------------------------------------------------------------------


async def test_linked_group_applies_all_or_nothing(engine: Engine) -> None:
    bank, user, merchant = await funded_pair(engine, 1_000)
    other = await new_account(engine)

    # The second transfer spends what the first one brings: a group sees its own changes.
    chained = await engine.submit(
        CreateTransfers(
            transfers=(transfer(bank, other, 500), transfer(other, merchant, 500)),
            linked=True,
            scope=SCOPE,
        )
    )
    assert chained.ok and len(chained.transfers) == 2
    group_ids = {t.group_id for t in chained.transfers}
    assert len(group_ids) == 1 and None not in group_ids
    assert (await account(engine, other)).posted_minor == 0
    assert (await account(engine, merchant)).posted_minor == 500

    failed = await engine.submit(
        CreateTransfers(
            transfers=(
                transfer(user, merchant, 600),
                transfer(user, other, 100, pending=True),
                transfer(user, other, 400),  # 1_000 - 600 - 100 leaves 300
            ),
            linked=True,
            scope=SCOPE,
        )
    )
    assert failed.code is ResultCode.INSUFFICIENT_FUNDS
    assert failed.failed_index == 2 and not failed.transfers
    user_after = await account(engine, user)
    assert user_after.posted_minor == 1_000 and user_after.debits_pending_minor == 0
    assert (await account(engine, merchant)).posted_minor == 500
    assert (await account(engine, other)).credits_pending_minor == 0
    async with engine.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM transfers") == 3
        assert await conn.fetchval("SELECT count(*) FROM entries") == 6

    unknown = await engine.submit(
        CreateTransfers(
            transfers=(transfer(user, merchant, 1), transfer(user, UNKNOWN_ID, 1)),
            linked=True,
            scope=SCOPE,
        )
    )
    assert unknown.code is ResultCode.ACCOUNT_NOT_FOUND and unknown.failed_index == 1
    assert (await account(engine, user)).posted_minor == 1_000
    await assert_reconciles(engine)


# -- entries -------------------------------------------------------------------------------


async def test_entries_page_newest_first(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    for amount in range(1, 6):
        assert (await move(engine, user, merchant, amount)).ok
    hold_id = await hold(engine, user, merchant, 10)
    assert (await engine.submit(VoidPending(transfer_id=hold_id, scope=SCOPE))).ok
    # user: funding, 5 transfers, hold, void = 8 entries

    seen = []
    cursor = None
    pages = 0
    while True:
        page = await engine.entries(user, scope=SCOPE, limit=3, starting_after=cursor)
        assert page is not None
        pages += 1
        seen.extend(page.entries)
        if not page.has_more:
            break
        assert len(page.entries) == 3
        cursor = page.entries[-1].id
    assert pages == 3 and len(seen) == 8
    ids = [e.id for e in seen]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 8
    assert [e.kind for e in seen[:3]] == [EntryKind.VOID, EntryKind.HOLD, EntryKind.TRANSFER]
    assert seen[-1].posted_delta_minor == 1_000 and seen[-1].posted_after_minor == 1_000
    assert [e.posted_delta_minor for e in seen[2:7]] == [-5, -4, -3, -2, -1]
    assert seen[0].posted_after_minor == 1_000 - 15 and seen[0].pending_after_minor == 0
    assert seen[1].pending_delta_minor == -10 and seen[0].pending_delta_minor == 10
    assert all(e.account_id == user for e in seen)

    # A full page that ends exactly at the last entry says so.
    exact = await engine.entries(user, scope=SCOPE, limit=8, starting_after=None)
    assert exact is not None and len(exact.entries) == 8 and not exact.has_more
    last = await engine.entries(user, scope=SCOPE, limit=5, starting_after=seen[-1].id)
    assert last is not None and last.entries == () and not last.has_more


async def test_entries_refuse_cursors_never_issued(engine: Engine) -> None:
    _, user, merchant = await funded_pair(engine, 1_000)
    assert (await move(engine, user, merchant, 1)).ok
    theirs = await engine.entries(merchant, scope=SCOPE, limit=10, starting_after=None)
    assert theirs is not None and len(theirs.entries) == 1
    with pytest.raises(InvalidCursor):
        await engine.entries(user, scope=SCOPE, limit=10, starting_after=123456789)
    with pytest.raises(InvalidCursor):  # an entry of another account is not this list's
        await engine.entries(user, scope=SCOPE, limit=10, starting_after=theirs.entries[0].id)
    assert await engine.entries(UNKNOWN_ID, scope=SCOPE, limit=10, starting_after=None) is None
    assert await engine.entries(user, scope="someone-else", limit=10, starting_after=None) is None


# -- reconciliation ------------------------------------------------------------------------


async def test_reconcile_is_clean_after_mixed_workload_and_catches_corruption(
    engine: Engine,
) -> None:
    bank = await new_account(engine, AccountKind.SYSTEM)
    users = [await new_account(engine) for _ in range(4)]
    shop = await new_account(engine, AccountKind.MERCHANT)
    for u in users:
        assert (await move(engine, bank, u, 5_000)).ok
    holds = [await hold(engine, u, shop, 700) for u in users]
    work = [
        move(engine, users[0], users[1], 100),
        move(engine, users[1], users[2], 9_999_999),  # refused
        engine.submit(PostPending(transfer_id=holds[0], scope=SCOPE)),
        engine.submit(PostPending(transfer_id=holds[1], amount_minor=1, scope=SCOPE)),
        engine.submit(VoidPending(transfer_id=holds[2], scope=SCOPE)),
        engine.submit(
            CreateTransfers(
                transfers=(transfer(users[3], shop, 100), transfer(shop, users[0], 50)),
                linked=True,
                scope=SCOPE,
            )
        ),
        *(move(engine, users[n % 4], users[(n + 1) % 4], 10, idempotency=key()) for n in range(40)),
    ]
    results = await asyncio.gather(*work)
    assert sum(not r.ok for r in results) == 1
    await assert_reconciles(engine)

    async with engine.pool.acquire() as conn:
        await conn.execute(
            "UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = $1", users[2]
        )
        outcomes = {o.name: o for o in await reconcile(conn)}
    assert outcomes["balances of each currency sum to zero"].violations == 1
    by_entries = outcomes["every balance equals the sum of its entries"]
    assert by_entries.violations == 1 and by_entries.examples[0]["id"] == users[2]
    assert outcomes["every account's latest entry shows its balance"].violations == 1
    assert outcomes["posted totals equal the posted transfers"].violations == 1
    assert outcomes["pending totals equal the open holds"].violations == 0


# -- concurrency ---------------------------------------------------------------------------


async def test_two_engines_crossing_transfers_never_deadlock(dsn: str) -> None:
    # No retries: a deadlock (or lock timeout) would surface as a failed submission.
    config = EngineConfig(
        lanes=4,
        lane=LaneConfig(batch_size_max=20, batch_retry_max=0, lock_timeout_ms=10_000),
        read_pool_size_max=2,
    )
    first = await Engine.open(dsn, config=config)
    second = await Engine.open(dsn, config=config)
    try:
        bank = await new_account(first, AccountKind.SYSTEM)
        a, b, c = [await new_account(first) for _ in range(3)]
        for each in (a, b, c):
            assert (await move(first, bank, each, 100_000)).ok

        def group(*pairs: tuple[int, int]) -> CreateTransfers:
            specs = tuple(transfer(d, cr, 3) for d, cr in pairs)
            return CreateTransfers(transfers=specs, linked=True, scope=SCOPE)

        work = []
        for n in range(150):
            work.append(move(first, a, b, 1 + n % 7, idempotency=key()))
            work.append(move(second, b, a, 1 + n % 5, idempotency=key()))
            if n % 5 == 0:
                work.append(first.submit(group((c, a), (b, c)), idempotency=key()))
                work.append(second.submit(group((a, c), (c, b)), idempotency=key()))
        results = await asyncio.gather(*work)
        assert all(r.ok for r in results), [r for r in results if not r.ok][:3]

        a_to_b = sum(1 + n % 7 for n in range(150))
        b_to_a = sum(1 + n % 5 for n in range(150))
        views = {i: await account(second, i) for i in (a, b, c)}
        assert views[a].posted_minor == 100_000 - a_to_b + b_to_a
        assert views[b].posted_minor == 100_000 + a_to_b - b_to_a
        assert views[c].posted_minor == 100_000
        assert sum(v.posted_minor for v in views.values()) == 300_000
        await assert_reconciles(first)
        async with first.pool.acquire() as conn:
            deadlocks = await conn.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            )
        assert not deadlocks
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_full_lane_queue_raises_overloaded(dsn: str) -> None:
    config = EngineConfig(lanes=1, lane=LaneConfig(queue_depth_max=1), read_pool_size_max=1)
    engine = await Engine.open(dsn, config=config)
    try:
        bank = await new_account(engine, AccountKind.SYSTEM)
        user = await new_account(engine)
        keys = [key() for _ in range(5)]
        results = await asyncio.gather(
            *(move(engine, bank, user, 1, idempotency=k) for k in keys), return_exceptions=True
        )
        overloaded = [k for k, r in zip(keys, results, strict=True) if isinstance(r, Overloaded)]
        landed = [r for r in results if isinstance(r, Result)]
        assert overloaded, results
        assert all(isinstance(r, Result | Overloaded) for r in results), results
        assert all(r.ok for r in landed)
        assert isinstance(Overloaded("x"), RetryableError)
        assert (await account(engine, user)).posted_minor == len(landed)

        # A refused request left no trace: retried with its key, it is applied now.
        for k in overloaded:
            retried = await move(engine, bank, user, 1, idempotency=k)
            assert retried.ok and not retried.replayed
        assert (await account(engine, user)).posted_minor == 5
        assert engine.lane_depths() == [0]
    finally:
        await engine.close()


@pytest.mark.parametrize(
    "command",
    [
        CreateTransfers(transfers=()),
        CreateTransfers(
            transfers=(
                TransferSpec(
                    debit_account_id=1, credit_account_id=2, amount_minor=0, currency="CNY"
                ),
            )
        ),
        CreateTransfers(
            transfers=(
                TransferSpec(
                    debit_account_id=1, credit_account_id=2, amount_minor=5, currency="XXX"
                ),
            )
        ),
        PostPending(transfer_id=1, amount_minor=-1),
        CreateAccount(currency="ABC", kind=AccountKind.USER),
    ],
)
async def test_malformed_command_is_refused_before_it_joins_a_batch(
    engine: Engine, command: Command
) -> None:
    with pytest.raises(InvalidCommand):
        await engine.submit(command)
    # The lanes are unharmed: the next well-formed command goes through.
    result = await engine.submit(CreateAccount(currency="CNY", kind=AccountKind.USER))
    assert result.ok


async def test_a_connection_in_a_broken_protocol_state_is_replaced(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fault suite: when PostgreSQL dies, an idle lane connection can take
    the server's last FATAL message before its socket closes, and its next statement
    fails with asyncpg's InternalClientError ("another operation is in progress"). That
    is a broken connection, not a bug: the lane must retry the batch on a new one."""
    _bank, user, merchant = await funded_pair(engine, 1_000)
    real_apply = store.apply_items
    failures = []

    async def apply_once_broken(conn: Any, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(conn)
            raise asyncpg.InternalClientError(
                "cannot switch to state 12; another operation (2) is in progress"
            )
        assert conn is not failures[0], "the broken connection was used again"
        return await real_apply(conn, *args, **kwargs)

    monkeypatch.setattr(store, "apply_items", apply_once_broken)
    result = await move(engine, user, merchant, 300)
    assert result.ok and failures
    assert (await account(engine, merchant)).posted_minor == 300
    await assert_reconciles(engine)
