"""Fill the ledger with past history, fast, for the growth benchmark (target 5).

`load_history` writes accounts, transfers and entries straight into the tables with
`INSERT ... SELECT generate_series`, in chunks, keeping every invariant reconcile checks:
each transfer has its debit and credit entry, each entry the balance after it, each
account's totals the sums of its transfers and entries. Its ids lie in the past (before
`end`), spread over [start, end), so they fall in the partitions of that time and never
meet ids the engine mints later; `created_at` matches each id's time.

The accounts are its own: a system account funds `users` user accounts with
`funding_minor` each, then the users pay each other small amounts. Live load can then run
on these same users (their latest entries are the loaded ones), on top of deep history.

Foreign-key triggers are skipped while loading (session_replication_role = replica,
which needs a superuser, as the embedded server's `postgres` is); reconcile checks the
same references afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from typing import Final

import asyncpg

from engine.history import id_at

CHUNK_TRANSFERS: Final = 500_000
IDS_PER_TRANSFER: Final = 3  # the transfer's id, then its debit and credit entry ids


@dataclasses.dataclass(frozen=True)
class LoadedHistory:
    system_id: int
    user_ids: list[int]
    transfers: int
    seconds: float


_CREATE_CHUNK: Final = """
CREATE TEMP TABLE load_chunk (id bigint, debit bigint, credit bigint, amount bigint,
                              created_at timestamptz) ON COMMIT DROP
"""

# $1 first transfer index of the chunk, $2 past-the-end index, $3 users, $4 base id,
# $5 id stride, $6 funding. Transfer i < users funds user i from the system account;
# later ones go from user i % users to another user.
_FILL_CHUNK: Final = """
INSERT INTO load_chunk
SELECT g.id, g.debit, g.credit, g.amount,
       to_timestamp((1735689600000 + (g.id >> 22)) / 1000.0)
FROM (
    SELECT $4::bigint + $3 + 1 + i * $5 AS id,
           CASE WHEN i < $3 THEN $4::bigint ELSE $4 + 1 + i % $3 END AS debit,
           CASE WHEN i < $3 THEN $4 + 1 + i
                ELSE $4 + 1 + (i % $3 + 1 + (i / $3) % ($3 - 1)) % $3 END AS credit,
           CASE WHEN i < $3 THEN $6::bigint ELSE 1 + i % 5 END AS amount
    FROM generate_series($1::bigint, $2::bigint - 1) AS i
) g
"""

_TRANSFERS: Final = """
INSERT INTO transfers (id, debit_account_id, credit_account_id, currency, amount_minor,
    posted_amount_minor, status, pending, scope, created_at)
SELECT id, debit, credit, $1, amount, amount, 'posted', false, $2, created_at
FROM load_chunk
"""

# Entries with their running balance: the account's balance before the chunk plus the
# running sum within it (ordered by entry id, as the engine's history is).
_ENTRIES: Final = """
INSERT INTO entries (account_id, id, transfer_id, kind, posted_delta_minor,
    pending_delta_minor, posted_after_minor, pending_after_minor, created_at)
SELECT e.account_id, e.id, e.transfer_id, 'transfer', e.delta, 0,
       a.credits_posted - a.debits_posted
           + sum(e.delta) OVER (PARTITION BY e.account_id ORDER BY e.id),
       0, e.created_at
FROM (SELECT debit AS account_id, id + 1 AS id, id AS transfer_id, -amount AS delta,
             created_at FROM load_chunk
      UNION ALL
      SELECT credit, id + 2, id, amount, created_at FROM load_chunk) e
JOIN accounts a ON a.id = e.account_id
"""

_BALANCES: Final = """
UPDATE accounts a SET debits_posted = a.debits_posted + m.debited,
                      credits_posted = a.credits_posted + m.credited
FROM (SELECT account_id, sum(debited) AS debited, sum(credited) AS credited
      FROM (SELECT debit AS account_id, amount AS debited, 0 AS credited FROM load_chunk
            UNION ALL
            SELECT credit, 0, amount FROM load_chunk) x
      GROUP BY account_id) m
WHERE a.id = m.account_id
"""


async def load_history(
    conn: asyncpg.Connection,
    *,
    users: int,
    transfers: int,
    start: datetime,
    end: datetime,
    funding_minor: int = 1_000_000_000,
    currency: str = "CNY",
    scope: str = "public",
    chunk: int = CHUNK_TRANSFERS,
    progress: bool = False,
) -> LoadedHistory:
    """Write `transfers` transfers (the first `users` of them fundings) between new
    accounts, with ids spread over [start, end); return the accounts made."""
    assert users >= 2 and transfers >= users, (users, transfers)
    t0 = time.monotonic()
    base = id_at(start)
    stride = max(IDS_PER_TRANSFER, (id_at(end) - base - users - 1) // transfers)
    last_id = base + users + 1 + (transfers - 1) * stride + IDS_PER_TRANSFER - 1
    assert last_id < id_at(end), "the range [start, end) is too short for these ids"
    await conn.execute("SET session_replication_role = replica")
    try:
        await conn.execute(
            """INSERT INTO accounts (id, currency, kind, overdraft_allowed, scope, created_at)
               SELECT $1::bigint + k, $2, CASE WHEN k = 0 THEN 'system' ELSE 'user' END, k = 0, $3,
                      to_timestamp((1735689600000 + (($1::bigint + k) >> 22)) / 1000.0)
               FROM generate_series(0, $4) AS k""",
            base,
            currency,
            scope,
            users,
        )
        for first in range(0, transfers, chunk):
            past = min(first + chunk, transfers)
            async with conn.transaction():
                await conn.execute("SET LOCAL work_mem = '256MB'")
                args = (first, past, users, base, stride, funding_minor, currency, scope)
                await _run_chunk(conn, args)
            if progress:
                print(f"[history] {past:,} of {transfers:,} transfers", flush=True)
    finally:
        await conn.execute("RESET session_replication_role")
    await conn.execute("ANALYZE accounts, transfers, entries")
    return LoadedHistory(
        system_id=base,
        user_ids=[base + 1 + k for k in range(users)],
        transfers=transfers,
        seconds=time.monotonic() - t0,
    )


async def _run_chunk(conn: asyncpg.Connection, args: tuple[object, ...]) -> None:
    await conn.execute(_CREATE_CHUNK)
    await conn.execute(_FILL_CHUNK, *args[:6])
    await conn.execute(_TRANSFERS, args[6], args[7])
    await conn.execute(_ENTRIES)
    await conn.execute(_BALANCES)
