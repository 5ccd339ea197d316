"""The only SQL of the write path: claim idempotency keys, lock, write, commit.

One batch is one transaction, in explicit phases:

1. claim: insert every idempotency key of the batch (sorted) with ON CONFLICT DO NOTHING.
   A key that was there already belongs to an earlier request: that command is not
   applied, and its stored answer is read back in phase 5. If another transaction holds
   the same key uncommitted, PostgreSQL makes this one wait for it.
2. lock holds: the pending transfers to post or void, FOR UPDATE in ascending id order.
3. lock accounts: every account the batch touches, FOR UPDATE in ascending id order.
4. decide in memory (engine.rules) and write it all in one statement: new rows, one
   balance UPDATE per touched account, and each key's answer.
5. replay: read the stored answers of keys claimed before.

Every transaction takes its locks in the same global order (keys, then holds, then
accounts, each sorted), so no two batches, lanes or processes can deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from engine.errors import OutcomeUnknown
from engine.model import (
    AccountKind,
    AccountView,
    Command,
    CreateTransfers,
    EntryKind,
    EntryView,
    Idempotency,
    Page,
    PostPending,
    Result,
    ResultCode,
    TransferStatus,
    TransferView,
    VoidPending,
    decode_result,
    encode_result,
)
from engine.rules import AccountState, BatchPlan, HoldState, IdSource, apply_batch

ENTRIES_PAGE_LIMIT_MAX: Final = 100

# Enum(value) costs microseconds; a batch converts thousands of rows, so look them up.
_KINDS: Final = {kind.value: kind for kind in AccountKind}
_STATUSES: Final = {status.value: status for status in TransferStatus}
_ENTRY_KINDS: Final = {kind.value: kind for kind in EntryKind}

_METADATA_DECODER: Final = msgspec.json.Decoder(dict[str, str])
_ENCODER: Final = msgspec.json.Encoder()

_CLAIM_KEYS: Final = """
INSERT INTO idempotency_keys (scope, key, fingerprint, created_at)
SELECT u.scope, u.key, u.fingerprint, $4
FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY AS u(scope, key, fingerprint, n)
ORDER BY u.n
ON CONFLICT DO NOTHING
RETURNING scope, key
"""

# What the rules need of a locked account (engine.rules.AccountState).
_LOCKED_ACCOUNT_COLUMNS: Final = """id, currency, kind, overdraft_allowed, scope,
       debits_posted, credits_posted, debits_pending, credits_pending"""

# Phases 1 and 3 in one statement, for batches without holds. The account scan runs
# only after the key insert has finished (a one-time filter on its row count is evaluated
# before the scan starts), so keys are still taken before accounts: the global lock order,
# and with it freedom from deadlock, is unchanged. Claimed keys come back as rows with a
# NULL id, locked accounts as rows with their id.
_CLAIM_KEYS_AND_LOCK_ACCOUNTS: Final = f"""
WITH claimed AS (
    INSERT INTO idempotency_keys (scope, key, fingerprint, created_at)
    SELECT u.scope, u.key, u.fingerprint, $4
    FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY
        AS u(scope, key, fingerprint, n)
    ORDER BY u.n
    ON CONFLICT DO NOTHING
    RETURNING scope, key
), claimed_count AS (
    SELECT count(*) AS n FROM claimed
), locked AS (
    SELECT {_LOCKED_ACCOUNT_COLUMNS}
    FROM accounts
    WHERE id = ANY($5::bigint[]) AND (SELECT n FROM claimed_count) >= 0
    ORDER BY id FOR UPDATE
)
SELECT NULL::bigint AS id, NULL::char(3) AS currency, NULL::text AS kind,
       NULL::boolean AS overdraft_allowed, c.scope, c.key, NULL::bigint AS debits_posted,
       NULL::bigint AS credits_posted, NULL::bigint AS debits_pending,
       NULL::bigint AS credits_pending
FROM claimed c
UNION ALL
SELECT l.id, l.currency, l.kind, l.overdraft_allowed, l.scope, NULL, l.debits_posted,
       l.credits_posted, l.debits_pending, l.credits_pending
FROM locked l
"""

_LOCK_HOLDS: Final = """
SELECT id, debit_account_id, credit_account_id, currency, amount_minor, status, pending,
       scope, group_id, metadata::text AS metadata, expires_at, created_at
FROM transfers WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
"""

_LOCK_ACCOUNTS: Final = f"""
SELECT {_LOCKED_ACCOUNT_COLUMNS}
FROM accounts WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
"""

# Data-modifying CTEs all run, in one round trip, against the same snapshot; none of them
# touches a row another one touches (holds resolved here were committed before the batch).
_WRITE: Final = """
WITH new_accounts AS (
    INSERT INTO accounts (id, currency, kind, overdraft_allowed, scope, metadata, created_at)
    SELECT u.id, u.currency, u.kind, u.overdraft_allowed, u.scope, u.metadata::jsonb, $1
    FROM unnest($2::bigint[], $3::text[], $4::text[], $5::bool[], $6::text[], $7::text[])
        AS u(id, currency, kind, overdraft_allowed, scope, metadata)
), new_transfers AS (
    INSERT INTO transfers (id, debit_account_id, credit_account_id, currency, amount_minor,
        posted_amount_minor, status, pending, group_id, scope, metadata, expires_at,
        created_at)
    SELECT u.id, u.debit, u.credit, u.currency, u.amount, u.posted, u.status, u.pending,
        u.group_id, u.scope, u.metadata::jsonb, u.expires_at, $1
    FROM unnest($8::bigint[], $9::bigint[], $10::bigint[], $11::text[], $12::bigint[],
        $13::bigint[], $14::text[], $15::bool[], $16::bigint[], $17::text[], $18::text[],
        $19::timestamptz[])
        AS u(id, debit, credit, currency, amount, posted, status, pending, group_id, scope,
             metadata, expires_at)
), resolved_holds AS (
    UPDATE transfers t
    SET status = u.status, posted_amount_minor = u.posted, resolved_at = $1
    FROM unnest($20::bigint[], $21::text[], $22::bigint[]) AS u(id, status, posted)
    WHERE t.id = u.id
), new_entries AS (
    INSERT INTO entries (account_id, id, transfer_id, kind, posted_delta_minor,
        pending_delta_minor, posted_after_minor, pending_after_minor, created_at)
    SELECT u.account_id, u.id, u.transfer_id, u.kind, u.posted_delta, u.pending_delta,
        u.posted_after, u.pending_after, $1
    FROM unnest($23::bigint[], $24::bigint[], $25::bigint[], $26::text[], $27::bigint[],
        $28::bigint[], $29::bigint[], $30::bigint[])
        AS u(account_id, id, transfer_id, kind, posted_delta, pending_delta, posted_after,
             pending_after)
), balances AS (
    UPDATE accounts a
    SET debits_posted = u.dp, credits_posted = u.cp, debits_pending = u.dpe,
        credits_pending = u.cpe
    FROM unnest($31::bigint[], $32::bigint[], $33::bigint[], $34::bigint[], $35::bigint[])
        AS u(id, dp, cp, dpe, cpe)
    WHERE a.id = u.id
)
UPDATE idempotency_keys k SET result = u.result
FROM unnest($36::text[], $37::text[], $38::bytea[]) AS u(scope, key, result)
WHERE k.scope = u.scope AND k.key = u.key
"""

_SAVE_ANSWER: Final = "UPDATE idempotency_keys SET result = $3 WHERE scope = $1 AND key = $2"

_READ_REPLAYS: Final = """
SELECT k.scope, k.key, k.fingerprint, k.result
FROM idempotency_keys k
JOIN unnest($1::text[], $2::text[]) AS u(scope, key) ON k.scope = u.scope AND k.key = u.key
"""


@dataclasses.dataclass(slots=True, frozen=True)
class Item:
    """One command of a batch, with the idempotency key it was submitted under, if any."""

    command: Command
    idempotency: Idempotency | None


async def apply_items(
    conn: asyncpg.Connection, items: Sequence[Item], *, now: datetime, next_id: IdSource
) -> list[Result]:
    """Apply `items` in one transaction and return a result for each, in order.

    Raises OutcomeUnknown when the connection broke while COMMIT was under way: the
    batch may or may not be durable, and only a retry with the same key can tell.
    """
    keyed = [item.idempotency for item in items if item.idempotency is not None]
    assert len({(k.scope, k.key) for k in keyed}) == len(keyed), "one key per batch"
    async with transaction(conn):
        return await _apply_in_transaction(conn, items, keyed, now=now, next_id=next_id)


@contextlib.asynccontextmanager
async def transaction(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """One write transaction: rolled back on any error, committed at the end.

    Raises OutcomeUnknown when the connection broke while COMMIT was under way.
    """
    tx = conn.transaction()
    await tx.start()
    try:
        yield
    except BaseException:
        # The first error is the one to report; a rollback on a broken connection fails
        # too, and the server rolls back by itself when the session ends.
        with contextlib.suppress(Exception):
            if not conn.is_closed():
                await tx.rollback()
        raise
    try:
        await tx.commit()
    except asyncpg.PostgresError:
        raise  # the server answered: the transaction did not commit
    except BaseException as exc:
        raise OutcomeUnknown(f"connection lost during COMMIT: {exc!r}") from exc


async def apply_commands(
    conn: asyncpg.Connection, commands: Sequence[Command], *, now: datetime, next_id: IdSource
) -> list[Result]:
    """Phases 2 to 4 for commands without keys, inside the caller's transaction.

    Product steps (engine.products) use it to move money in the same transaction as
    their own state change. The caller has taken its own locks (keys, then product
    rows) first, so the global lock order holds.
    """
    commands = list(commands)
    holds = await _lock_holds(conn, commands)
    accounts = await _lock_accounts(conn, commands, holds)
    plan = apply_batch(commands, accounts, holds, now=now, next_id=next_id)
    await _write(conn, plan, [(None, result) for result in plan.results], now)
    return list(plan.results)


async def claim_key(conn: asyncpg.Connection, key: Idempotency, *, now: datetime) -> bool:
    """Phase 1 for one key: True if this request is the first with it. Waits while
    another transaction holds the same key uncommitted."""
    return bool(await _claim_keys(conn, [key], now))


async def stored_answer(conn: asyncpg.Connection, key: Idempotency) -> tuple[bytes, bytes]:
    """The fingerprint and answer stored under a key claimed by a committed request."""
    row = await conn.fetchrow(_READ_REPLAYS, [key.scope], [key.key])
    assert row is not None and row["result"] is not None, "a committed key has its answer"
    return bytes(row["fingerprint"]), bytes(row["result"])


async def save_answer(conn: asyncpg.Connection, key: Idempotency, answer: bytes) -> None:
    await conn.execute(_SAVE_ANSWER, key.scope, key.key, answer)


async def _apply_in_transaction(
    conn: asyncpg.Connection,
    items: Sequence[Item],
    keyed: list[Idempotency],
    *,
    now: datetime,
    next_id: IdSource,
) -> list[Result]:
    all_commands = [item.command for item in items]
    if any(isinstance(c, PostPending | VoidPending) for c in all_commands):
        # A hold must be locked before its accounts, which only its row names.
        claimed = await _claim_keys(conn, keyed, now)
        fresh = [i for i, item in enumerate(items) if _is_fresh(item, claimed)]
        holds = await _lock_holds(conn, [all_commands[i] for i in fresh])
        accounts = await _lock_accounts(conn, [all_commands[i] for i in fresh], holds)
    else:
        # One round trip for phases 1 and 3. It also locks the accounts of commands whose
        # key turns out to be claimed already; they are left untouched, so that is harmless.
        claimed, accounts = await _claim_keys_and_lock(conn, keyed, all_commands, now)
        fresh = [i for i, item in enumerate(items) if _is_fresh(item, claimed)]
        holds = {}
    commands = [all_commands[i] for i in fresh]
    plan = apply_batch(commands, accounts, holds, now=now, next_id=next_id)
    decided = dict(zip(fresh, plan.results, strict=True))
    await _write(conn, plan, [(items[i].idempotency, decided[i]) for i in fresh], now)
    stale = [item.idempotency for i, item in enumerate(items) if i not in decided]
    replays = await _read_replays(conn, stale)
    answers: list[Result] = []
    for i, item in enumerate(items):
        if i in decided:
            answers.append(decided[i])
        else:
            assert item.idempotency is not None
            answers.append(replays[(item.idempotency.scope, item.idempotency.key)])
    return answers


def _is_fresh(item: Item, claimed: set[tuple[str, str]]) -> bool:
    key = item.idempotency
    return key is None or (key.scope, key.key) in claimed


def _key_columns(keys: list[Idempotency]) -> list[list[Any]]:
    """Key columns sorted by (scope, key): every batch claims keys in this one order, so
    two batches waiting on each other's keys can never wait in a circle."""
    ordered = sorted(keys, key=lambda k: (k.scope, k.key))
    return [[k.scope for k in ordered], [k.key for k in ordered], [k.fingerprint for k in ordered]]


async def _claim_keys(
    conn: asyncpg.Connection, keys: list[Idempotency], now: datetime
) -> set[tuple[str, str]]:
    if not keys:
        return set()
    rows = await conn.fetch(_CLAIM_KEYS, *_key_columns(keys), now)
    return {(row["scope"], row["key"]) for row in rows}


async def _claim_keys_and_lock(
    conn: asyncpg.Connection, keys: list[Idempotency], commands: list[Command], now: datetime
) -> tuple[set[tuple[str, str]], dict[int, AccountState]]:
    rows = await conn.fetch(
        _CLAIM_KEYS_AND_LOCK_ACCOUNTS,
        *_key_columns(keys),
        now,
        sorted(_account_ids(commands, {})),
    )
    claimed = {(row["scope"], row["key"]) for row in rows if row["id"] is None}
    accounts = {row["id"]: _account_state(row) for row in rows if row["id"] is not None}
    return claimed, accounts


async def _lock_holds(conn: asyncpg.Connection, commands: list[Command]) -> dict[int, HoldState]:
    ids = sorted({c.transfer_id for c in commands if isinstance(c, PostPending | VoidPending)})
    if not ids:
        return {}
    rows = await conn.fetch(_LOCK_HOLDS, ids)
    return {row["id"]: _hold_state(row) for row in rows}


async def _lock_accounts(
    conn: asyncpg.Connection, commands: list[Command], holds: dict[int, HoldState]
) -> dict[int, AccountState]:
    ids = _account_ids(commands, holds)
    if not ids:
        return {}
    rows = await conn.fetch(_LOCK_ACCOUNTS, sorted(ids))
    return {row["id"]: _account_state(row) for row in rows}


def _account_ids(commands: list[Command], holds: dict[int, HoldState]) -> set[int]:
    ids: set[int] = set()
    for command in commands:
        if isinstance(command, CreateTransfers):
            for spec in command.transfers:
                ids.add(spec.debit_account_id)
                ids.add(spec.credit_account_id)
    for hold in holds.values():
        ids.add(hold.debit_account_id)
        ids.add(hold.credit_account_id)
    return ids


async def _write(
    conn: asyncpg.Connection,
    plan: BatchPlan,
    answers: list[tuple[Idempotency | None, Result]],
    now: datetime,
) -> None:
    keyed = [(key, result) for key, result in answers if key is not None]
    await conn.execute(
        _WRITE,
        now,
        *_columns_of_new_accounts(plan),
        *_columns_of_new_transfers(plan),
        [u.id for u in plan.hold_updates],
        [u.status.value for u in plan.hold_updates],
        [u.posted_amount_minor for u in plan.hold_updates],
        *_columns_of_entries(plan),
        *_columns_of_balances(plan),
        [key.scope for key, _ in keyed],
        [key.key for key, _ in keyed],
        [encode_result(result) for _, result in keyed],
    )


def _columns_of_new_accounts(plan: BatchPlan) -> list[list[Any]]:
    created = plan.accounts_created
    return [
        [a.id for a, _ in created],
        [a.currency for a, _ in created],
        [a.kind.value for a, _ in created],
        [a.overdraft_allowed for a, _ in created],
        [a.scope for a, _ in created],
        [_ENCODER.encode(m).decode() for _, m in created],
    ]


def _columns_of_new_transfers(plan: BatchPlan) -> list[list[Any]]:
    ts = [t for t, _ in plan.transfers_created]
    return [
        [t.id for t in ts],
        [t.debit_account_id for t in ts],
        [t.credit_account_id for t in ts],
        [t.currency for t in ts],
        [t.amount_minor for t in ts],
        [t.posted_amount_minor for t in ts],
        [t.status.value for t in ts],
        [t.pending for t in ts],
        [t.group_id for t in ts],
        [scope for _, scope in plan.transfers_created],
        [_ENCODER.encode(t.metadata).decode() for t in ts],
        [t.expires_at for t in ts],
    ]


def _columns_of_entries(plan: BatchPlan) -> list[list[Any]]:
    es = plan.entries
    return [
        [e.account_id for e in es],
        [e.id for e in es],
        [e.transfer_id for e in es],
        [e.kind.value for e in es],
        [e.posted_delta_minor for e in es],
        [e.pending_delta_minor for e in es],
        [e.posted_after_minor for e in es],
        [e.pending_after_minor for e in es],
    ]


def _columns_of_balances(plan: BatchPlan) -> list[list[int]]:
    accounts = list(plan.accounts_changed.values())
    return [
        [a.id for a in accounts],
        [a.debits_posted for a in accounts],
        [a.credits_posted for a in accounts],
        [a.debits_pending for a in accounts],
        [a.credits_pending for a in accounts],
    ]


async def _read_replays(
    conn: asyncpg.Connection, keys: list[Idempotency | None]
) -> dict[tuple[str, str], Result]:
    present = [k for k in keys if k is not None]
    if not present:
        return {}
    rows = await conn.fetch(_READ_REPLAYS, [k.scope for k in present], [k.key for k in present])
    stored = {(row["scope"], row["key"]): row for row in rows}
    replays: dict[tuple[str, str], Result] = {}
    for key in present:
        row = stored[(key.scope, key.key)]
        assert row["result"] is not None, "a committed key always carries its answer"
        replays[(key.scope, key.key)] = _replay(row, key)
    return replays


def _replay(row: asyncpg.Record, key: Idempotency) -> Result:
    if bytes(row["fingerprint"]) != key.fingerprint:
        return Result(
            code=ResultCode.IDEMPOTENCY_KEY_REUSED,
            detail="this idempotency key was used with a different request",
        )
    return msgspec.structs.replace(decode_result(bytes(row["result"])), replayed=True)


def _hold_state(row: asyncpg.Record) -> HoldState:
    return HoldState(
        id=row["id"],
        debit_account_id=row["debit_account_id"],
        credit_account_id=row["credit_account_id"],
        currency=row["currency"],
        amount_minor=row["amount_minor"],
        status=_STATUSES[row["status"]],
        pending=row["pending"],
        scope=row["scope"],
        group_id=row["group_id"],
        metadata=_METADATA_DECODER.decode(row["metadata"]),
        expires_at=row["expires_at"],
        created_at=row["created_at"],
    )


def _account_state(row: asyncpg.Record) -> AccountState:
    return AccountState(
        id=row["id"],
        currency=row["currency"],
        kind=_KINDS[row["kind"]],
        overdraft_allowed=row["overdraft_allowed"],
        scope=row["scope"],
        debits_posted=row["debits_posted"],
        credits_posted=row["credits_posted"],
        debits_pending=row["debits_pending"],
        credits_pending=row["credits_pending"],
    )


# -- reads -------------------------------------------------------------------------------

_ACCOUNT_COLUMNS: Final = """id, currency, kind, overdraft_allowed, scope, debits_posted,
    credits_posted, debits_pending, credits_pending, metadata::text AS metadata, created_at"""

_TRANSFER_COLUMNS: Final = """id, debit_account_id, credit_account_id, currency, amount_minor,
    posted_amount_minor, status, pending, group_id, scope, metadata::text AS metadata,
    expires_at, created_at, resolved_at"""


def _visible(row: asyncpg.Record | None, scope: str | None) -> bool:
    return row is not None and (scope is None or row["scope"] == scope)


async def read_account(
    conn: asyncpg.Connection, account_id: int, *, scope: str | None
) -> AccountView | None:
    row = await conn.fetchrow(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = $1", account_id)
    if row is None or not _visible(row, scope):
        return None
    return AccountView(
        id=row["id"],
        currency=row["currency"],
        kind=_KINDS[row["kind"]],
        overdraft_allowed=row["overdraft_allowed"],
        debits_posted_minor=row["debits_posted"],
        credits_posted_minor=row["credits_posted"],
        debits_pending_minor=row["debits_pending"],
        credits_pending_minor=row["credits_pending"],
        metadata=_METADATA_DECODER.decode(row["metadata"]),
        created_at=row["created_at"],
    )


async def read_transfer(
    conn: asyncpg.Connection, transfer_id: int, *, scope: str | None
) -> TransferView | None:
    row = await conn.fetchrow(
        f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE id = $1", transfer_id
    )
    if row is None or not _visible(row, scope):
        return None
    return TransferView(
        id=row["id"],
        debit_account_id=row["debit_account_id"],
        credit_account_id=row["credit_account_id"],
        currency=row["currency"],
        amount_minor=row["amount_minor"],
        posted_amount_minor=row["posted_amount_minor"],
        status=_STATUSES[row["status"]],
        pending=row["pending"],
        group_id=row["group_id"],
        metadata=_METADATA_DECODER.decode(row["metadata"]),
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        resolved_at=row["resolved_at"],
    )


async def read_entries(
    conn: asyncpg.Connection,
    account_id: int,
    *,
    limit: int,
    starting_after: int | None,
) -> Page:
    """Entries of one account, newest first; `starting_after` is the last id of a page."""
    assert 1 <= limit <= ENTRIES_PAGE_LIMIT_MAX, limit
    rows = await conn.fetch(
        """SELECT account_id, id, transfer_id, kind, posted_delta_minor, pending_delta_minor,
                  posted_after_minor, pending_after_minor, created_at
           FROM entries WHERE account_id = $1 AND ($2::bigint IS NULL OR id < $2)
           ORDER BY id DESC LIMIT $3""",
        account_id,
        starting_after,
        limit + 1,
    )
    entries = tuple(
        EntryView(
            id=row["id"],
            account_id=row["account_id"],
            transfer_id=row["transfer_id"],
            kind=_ENTRY_KINDS[row["kind"]],
            posted_delta_minor=row["posted_delta_minor"],
            pending_delta_minor=row["pending_delta_minor"],
            posted_after_minor=row["posted_after_minor"],
            pending_after_minor=row["pending_after_minor"],
            created_at=row["created_at"],
        )
        for row in rows[:limit]
    )
    return Page(entries=entries, has_more=len(rows) > limit)


async def entry_exists(conn: asyncpg.Connection, account_id: int, entry_id: int) -> bool:
    found = await conn.fetchval(
        "SELECT true FROM entries WHERE account_id = $1 AND id = $2", account_id, entry_id
    )
    return bool(found)


async def expired_hold_ids(conn: asyncpg.Connection, *, now: datetime, limit: int) -> list[int]:
    rows = await conn.fetch(
        """SELECT id FROM transfers
           WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at <= $1
           ORDER BY expires_at LIMIT $2""",
        now,
        limit,
    )
    return [row["id"] for row in rows]


async def reap_idempotency_keys(
    conn: asyncpg.Connection, *, created_before: datetime, limit: int
) -> int:
    """Delete at most `limit` keys created before `created_before`; return how many."""
    status: str = await conn.execute(
        """DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM idempotency_keys WHERE created_at < $1
               ORDER BY created_at LIMIT $2))""",
        created_before,
        limit,
    )
    return int(status.split()[-1])
