"""The only SQL of the write path: claim idempotency keys, lock, write, commit.

One batch is one transaction, in explicit phases:

1. claim: insert every idempotency key of the batch (sorted) with ON CONFLICT DO NOTHING.
   A key that was there already belongs to an earlier request: that command is not
   applied, and its stored answer is read back in phase 5. If another transaction holds
   the same key uncommitted, PostgreSQL makes this one wait for it.
2. lock step-up challenges to confirm, then the pending transfers to post or void,
   FOR UPDATE in ascending id order.
3. lock accounts: every account the batch touches, FOR UPDATE in ascending id order,
   with their risk rules and counters (engine.risk) and the kinds' default rules.
4. decide in memory (engine.rules) and write it all in one statement: new rows, one
   balance (and risk counter) UPDATE per touched account, challenges, risk refusals,
   and each key's answer.
5. replay: read the stored answers of keys claimed before.

Every transaction takes its locks in the same global order (keys, then holds, then
accounts, each sorted), so no two batches, lanes or processes can deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from engine import risk
from engine.errors import OutcomeUnknown
from engine.model import (
    STEP_UP_CODE_DIGITS,
    AccountKind,
    AccountView,
    Command,
    ConfirmStepUp,
    CreateTransfers,
    EntryKind,
    EntryView,
    Idempotency,
    Page,
    PostPending,
    Result,
    ResultCode,
    StepUpStatus,
    TransferStatus,
    TransferView,
    VoidPending,
    decode_result,
    encode_result,
)
from engine.risk import RiskCounters, RiskRules
from engine.rules import (
    AccountState,
    BatchPlan,
    ChallengeState,
    HoldState,
    IdSource,
    NewChallenge,
    apply_batch,
)

ENTRIES_PAGE_LIMIT_MAX: Final = 100

# Enum(value) costs microseconds; a batch converts thousands of rows, so look them up.
_KINDS: Final = {kind.value: kind for kind in AccountKind}
_STATUSES: Final = {status.value: status for status in TransferStatus}
_ENTRY_KINDS: Final = {kind.value: kind for kind in EntryKind}
_STEP_UP_STATUSES: Final = {status.value: status for status in StepUpStatus}
_COMMAND_DECODER: Final = msgspec.json.Decoder(CreateTransfers)

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

# What the rules need of a locked account (engine.rules.AccountState). `risk` is NULL for
# an account with no rules or counters of its own (almost all), so that costs one NULL;
# else [frozen, max per transfer, daily max, velocity max, step-up threshold, counted
# minute, outflow of that day, transfers in that minute] (see _risk_of).
_LOCKED_ACCOUNT_COLUMNS: Final = """id, currency, kind, overdraft_allowed, scope,
       debits_posted, credits_posted, debits_pending, credits_pending,
       CASE WHEN risk_frozen OR risk_counted_minute IS NOT NULL
                 OR risk_max_per_transfer_minor IS NOT NULL
                 OR risk_daily_outflow_max_minor IS NOT NULL
                 OR risk_velocity_max_per_minute IS NOT NULL
                 OR risk_step_up_threshold_minor IS NOT NULL
            THEN ARRAY[risk_frozen::int::bigint, risk_max_per_transfer_minor,
                       risk_daily_outflow_max_minor, risk_velocity_max_per_minute::bigint,
                       risk_step_up_threshold_minor, risk_counted_minute,
                       risk_outflow_day_minor, risk_transfers_minute::bigint]
       END AS risk"""

# The kinds' default rules, as rows of the locking statement's answer with a NULL id and
# key (usually none: the table is empty unless an operator set rules). Read in the same
# statement, so rules cost no round trip.
_KIND_RULE_ROWS: Final = """
SELECT NULL::bigint, NULL::char(3), r.kind, NULL::boolean, NULL::text, NULL::text,
       NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
       ARRAY[0, r.max_per_transfer_minor, r.daily_outflow_max_minor,
             r.velocity_max_per_minute::bigint, r.step_up_threshold_minor,
             NULL, 0, 0]::bigint[]
FROM risk_kind_rules r
"""

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
       NULL::bigint AS credits_pending, NULL::bigint[] AS risk
FROM claimed c
UNION ALL
SELECT l.id, l.currency, l.kind, l.overdraft_allowed, l.scope, NULL, l.debits_posted,
       l.credits_posted, l.debits_pending, l.credits_pending, l.risk
FROM locked l
UNION ALL {_KIND_RULE_ROWS}"""

_LOCK_HOLDS: Final = """
SELECT id, debit_account_id, credit_account_id, currency, amount_minor, status, pending,
       scope, group_id, metadata::text AS metadata, expires_at, created_at
FROM transfers WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
"""

_LOCK_ACCOUNTS: Final = f"""
WITH locked AS (
    SELECT {_LOCKED_ACCOUNT_COLUMNS}
    FROM accounts WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
)
SELECT l.id, l.currency, l.kind, l.overdraft_allowed, l.scope, NULL::text AS key,
       l.debits_posted, l.credits_posted, l.debits_pending, l.credits_pending, l.risk
FROM locked l
UNION ALL {_KIND_RULE_ROWS}"""

_LOCK_CHALLENGES: Final = """
SELECT id, scope, account_id, command, salt, code_hash, attempts, status, expires_at
FROM step_up_challenges WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
"""

# Data-modifying CTEs all run, in one round trip, against the same snapshot; none of them
# touches a row another one touches (holds resolved here were committed before the batch).
_WRITE_ROWS: Final = """
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
"""

_WRITE_BALANCES: Final = """
), balances AS (
    UPDATE accounts a
    SET debits_posted = u.dp, credits_posted = u.cp, debits_pending = u.dpe,
        credits_pending = u.cpe
    FROM unnest($31::bigint[], $32::bigint[], $33::bigint[], $34::bigint[], $35::bigint[])
        AS u(id, dp, cp, dpe, cpe)
    WHERE a.id = u.id
"""

_WRITE_BALANCES_AND_RISK: Final = """
), balances AS (
    -- Risk counters travel with the balances (NULL: the account keeps no counters).
    UPDATE accounts a
    SET debits_posted = u.dp, credits_posted = u.cp, debits_pending = u.dpe,
        credits_pending = u.cpe,
        risk_counted_minute = coalesce(u.minute, a.risk_counted_minute),
        risk_outflow_day_minor = coalesce(u.outflow, a.risk_outflow_day_minor),
        risk_transfers_minute = coalesce(u.transfers, a.risk_transfers_minute)
    FROM unnest($31::bigint[], $32::bigint[], $33::bigint[], $34::bigint[], $35::bigint[],
        $39::bigint[], $40::bigint[], $41::int[])
        AS u(id, dp, cp, dpe, cpe, minute, outflow, transfers)
    WHERE a.id = u.id
), challenges AS (
    INSERT INTO step_up_challenges (id, scope, account_id, command, salt, code_hash,
        status, expires_at, created_at, updated_at)
    SELECT u.id, u.scope, u.account_id, u.command, u.salt, u.code_hash, 'pending',
        u.expires_at, $1, $1
    FROM unnest($42::bigint[], $43::text[], $44::bigint[], $45::bytea[], $46::bytea[],
        $47::bytea[], $48::timestamptz[])
        AS u(id, scope, account_id, command, salt, code_hash, expires_at)
), outbox AS (
    INSERT INTO step_up_outbox (challenge_id, account_id, message, created_at)
    SELECT u.id, u.account_id, u.message, $1
    FROM unnest($42::bigint[], $44::bigint[], $49::text[]) AS u(id, account_id, message)
), challenge_updates AS (
    UPDATE step_up_challenges c
    SET status = u.status, attempts = u.attempts, result_code = u.result_code, updated_at = $1
    FROM unnest($50::bigint[], $51::text[], $52::int[], $53::text[])
        AS u(id, status, attempts, result_code)
    WHERE c.id = u.id
), refusals AS (
    INSERT INTO risk_refusals (id, account_id, code, reason, amount_minor, scope,
        idempotency_key, created_at)
    SELECT u.id, u.account_id, u.code, u.reason, u.amount, u.scope, u.key, $1
    FROM unnest($54::bigint[], $55::bigint[], $56::text[], $57::text[], $58::bigint[],
        $59::text[], $60::text[])
        AS u(id, account_id, code, reason, amount, scope, key)
"""

_WRITE_ANSWERS: Final = """)
UPDATE idempotency_keys k SET result = u.result
FROM unnest($36::text[], $37::text[], $38::bytea[]) AS u(scope, key, result)
WHERE k.scope = u.scope AND k.key = u.key
"""

_SAVE_ANSWER: Final = "UPDATE idempotency_keys SET result = $3 WHERE scope = $1 AND key = $2"

# A batch with no risk work (no account with rules, no challenge, no refusal: every
# batch of a ledger without rules) runs the plain statement, so rules cost it nothing.
_WRITE: Final = _WRITE_ROWS + _WRITE_BALANCES + _WRITE_ANSWERS
_WRITE_WITH_RISK: Final = _WRITE_ROWS + _WRITE_BALANCES_AND_RISK + _WRITE_ANSWERS

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
    assert not any(isinstance(c, ConfirmStepUp) for c in commands), "steps confirm no step-up"
    holds = await _lock_holds(conn, commands)
    accounts = await _lock_accounts(conn, commands, holds, {})
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
    challenges: dict[int, ChallengeState] = {}
    if any(isinstance(c, PostPending | VoidPending | ConfirmStepUp) for c in all_commands):
        # A hold or challenge must be locked before its accounts, which only its row names.
        claimed = await _claim_keys(conn, keyed, now)
        fresh = [i for i, item in enumerate(items) if _is_fresh(item, claimed)]
        fresh_commands = [all_commands[i] for i in fresh]
        challenges = await _lock_challenges(conn, fresh_commands)
        holds = await _lock_holds(conn, fresh_commands)
        accounts = await _lock_accounts(conn, fresh_commands, holds, challenges)
    else:
        # One round trip for phases 1 and 3. It also locks the accounts of commands whose
        # key turns out to be claimed already; they are left untouched, so that is harmless.
        claimed, accounts = await _claim_keys_and_lock(conn, keyed, all_commands, now)
        fresh = [i for i, item in enumerate(items) if _is_fresh(item, claimed)]
        holds = {}
    commands = [all_commands[i] for i in fresh]
    plan = apply_batch(commands, accounts, holds, now=now, next_id=next_id, challenges=challenges)
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
    claimed = {
        (row["scope"], row["key"]) for row in rows if row["id"] is None and row["key"] is not None
    }
    return claimed, _account_states(rows)


async def _lock_holds(conn: asyncpg.Connection, commands: list[Command]) -> dict[int, HoldState]:
    ids = sorted({c.transfer_id for c in commands if isinstance(c, PostPending | VoidPending)})
    if not ids:
        return {}
    rows = await conn.fetch(_LOCK_HOLDS, ids)
    return {row["id"]: _hold_state(row) for row in rows}


async def _lock_challenges(
    conn: asyncpg.Connection, commands: list[Command]
) -> dict[int, ChallengeState]:
    ids = sorted({c.challenge_id for c in commands if isinstance(c, ConfirmStepUp)})
    if not ids:
        return {}
    rows = await conn.fetch(_LOCK_CHALLENGES, ids)
    return {row["id"]: _challenge_state(row) for row in rows}


async def _lock_accounts(
    conn: asyncpg.Connection,
    commands: list[Command],
    holds: dict[int, HoldState],
    challenges: dict[int, ChallengeState],
) -> dict[int, AccountState]:
    ids = _account_ids(commands, holds)
    for challenge in challenges.values():
        ids |= _account_ids([challenge.command], {})
    if not ids:
        return {}
    return _account_states(await conn.fetch(_LOCK_ACCOUNTS, sorted(ids)))


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
    arguments = [
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
    ]
    if not (plan.risky or plan.challenge_updates or plan.refusals or plan.challenges_created):
        await conn.execute(_WRITE, *arguments)
        return
    await conn.execute(
        _WRITE_WITH_RISK,
        *arguments,
        *_columns_of_counters(plan),
        *_columns_of_new_challenges(plan.challenges_created),
        [u.id for u in plan.challenge_updates],
        [u.status.value for u in plan.challenge_updates],
        [u.attempts for u in plan.challenge_updates],
        [None if u.result_code is None else u.result_code.value for u in plan.challenge_updates],
        *_columns_of_refusals(plan, [key for key, _ in answers]),
    )


def _columns_of_counters(plan: BatchPlan) -> list[list[int | None]]:
    """Counters of the changed accounts that keep them, in the order of the balances;
    None for the others (which is every account in a ledger without risk limits)."""
    columns: list[list[int | None]] = [[], [], []]
    for a in plan.accounts_changed.values():
        counters = a.counters if a.risk is not None and a.risk.counted else None
        if counters is None:
            for column in columns:
                column.append(None)
        else:
            columns[0].append(counters.minute)
            columns[1].append(counters.outflow_day_minor)
            columns[2].append(counters.transfers_minute)
    return columns


def _columns_of_new_challenges(created: list[NewChallenge]) -> list[list[Any]]:
    """The challenges' rows, each with a fresh code: only its salted hash is stored, and
    the code itself goes to the payer's (simulated) SMS outbox, never into an answer."""
    columns: list[list[Any]] = [[] for _ in range(8)]
    for c in created:
        code = f"{secrets.randbelow(10**STEP_UP_CODE_DIGITS):0{STEP_UP_CODE_DIGITS}d}"
        salt = secrets.token_bytes(16)
        row = (
            c.id,
            c.scope,
            c.account_id,
            _ENCODER.encode(c.command),
            salt,
            risk.hash_code(salt, c.id, code),
            c.expires_at,
            f"txengine: your confirmation code is {code}. It expires in "
            f"{risk.STEP_UP_TTL_S // 60} minutes. Never share it.",
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _columns_of_refusals(plan: BatchPlan, keys: list[Idempotency | None]) -> list[list[Any]]:
    rs = plan.refusals
    ks = [keys[r.command_index] for r in rs]
    return [
        [r.id for r in rs],
        [r.account_id for r in rs],
        [r.code.value for r in rs],
        [r.reason for r in rs],
        [r.amount_minor for r in rs],
        [None if k is None else k.scope for k in ks],
        [None if k is None else k.key for k in ks],
    ]


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


def _account_states(rows: list[asyncpg.Record]) -> dict[int, AccountState]:
    """The locked accounts among `rows`, with their rules merged with their kind's.
    Rows with neither id nor key carry a kind's default rules."""
    kind_rules: dict[str, RiskRules] = {}
    accounts: dict[int, AccountState] = {}
    for row in rows:
        account_id = row["id"]
        if account_id is None:
            if row["key"] is None:
                kind_rules[row["kind"]] = _risk_of(row["risk"])[0]
            continue
        account = AccountState(
            id=account_id,
            currency=row["currency"],
            kind=_KINDS[row["kind"]],
            overdraft_allowed=row["overdraft_allowed"],
            scope=row["scope"],
            debits_posted=row["debits_posted"],
            credits_posted=row["credits_posted"],
            debits_pending=row["debits_pending"],
            credits_pending=row["credits_pending"],
        )
        own = row["risk"]
        if own is not None:  # rare: only accounts with rules or counters of their own
            rules, account.counters = _risk_of(own)
            account.risk = risk.merge(None, rules)
        accounts[account_id] = account
    if kind_rules:
        for account in accounts.values():
            account.risk = risk.merge(kind_rules.get(account.kind), account.risk)
    return accounts


def _risk_of(values: list[int | None]) -> tuple[RiskRules, RiskCounters | None]:
    """Rules and counters from the `risk` array of _LOCKED_ACCOUNT_COLUMNS."""
    frozen, per_transfer, daily, velocity, step_up, minute, outflow, transfers = values
    rules = RiskRules(
        frozen=bool(frozen),
        max_per_transfer_minor=per_transfer,
        daily_outflow_max_minor=daily,
        velocity_max_per_minute=velocity,
        step_up_threshold_minor=step_up,
    )
    counters = None
    if minute is not None:
        assert outflow is not None and transfers is not None
        counters = RiskCounters(
            minute=minute, outflow_day_minor=outflow, transfers_minute=transfers
        )
    return rules, counters


def _challenge_state(row: asyncpg.Record) -> ChallengeState:
    return ChallengeState(
        id=row["id"],
        scope=row["scope"],
        account_id=row["account_id"],
        command=_COMMAND_DECODER.decode(bytes(row["command"])),
        salt=bytes(row["salt"]),
        code_hash=bytes(row["code_hash"]),
        attempts=row["attempts"],
        status=_STEP_UP_STATUSES[row["status"]],
        expires_at=row["expires_at"],
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


async def reap_step_up_messages(conn: asyncpg.Connection, *, now: datetime, limit: int) -> int:
    """Delete at most `limit` outbox messages whose code can no longer be used (the
    step-up expired, was confirmed or is dead): a code in clear should not outlive its
    use. The challenges themselves (hashes only) and the refusals are kept as records."""
    status: str = await conn.execute(
        """DELETE FROM step_up_outbox WHERE challenge_id = ANY(ARRAY(
               SELECT o.challenge_id FROM step_up_outbox o
               JOIN step_up_challenges c ON c.id = o.challenge_id
               WHERE c.expires_at <= $1 OR c.status <> 'pending'
               ORDER BY o.challenge_id LIMIT $2))""",
        now,
        limit,
    )
    return int(status.split()[-1])
