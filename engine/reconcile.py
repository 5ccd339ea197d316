"""Invariants over the whole ledger, checked in one consistent snapshot.

Each check is a query that returns the rows breaking it, so a healthy ledger returns
none anywhere and a broken one says exactly where. `txengine reconcile` prints them.
"""

from __future__ import annotations

import dataclasses
from typing import Final

import asyncpg

VIOLATIONS_SHOWN_MAX: Final = 20

# Per account, what archived history added up to (engine.history): the folded '*' rows
# and the rows of partitions already detached; rows staged for a partition still
# attached do not count yet, its rows being online.
_ARCHIVED: Final = """(SELECT z.account_id, sum(z.posted_delta_minor) AS posted_delta_minor,
                   sum(z.pending_delta_minor) AS pending_delta_minor,
                   sum(z.transfers_debited_minor) AS transfers_debited_minor,
                   sum(z.transfers_credited_minor) AS transfers_credited_minor
            FROM archived_account_totals z
            LEFT JOIN history_partitions h ON h.name = z.partition_name
            WHERE z.partition_name = '*' OR h.state <> 'attached'
            GROUP BY z.account_id)"""

CHECKS: Final[tuple[tuple[str, str], ...]] = (
    (
        "balances of each currency sum to zero",
        """SELECT currency, sum(credits_posted - debits_posted) AS posted,
                  sum(credits_pending - debits_pending) AS pending
           FROM accounts GROUP BY currency
           HAVING sum(credits_posted - debits_posted) <> 0
               OR sum(credits_pending - debits_pending) <> 0""",
    ),
    (
        "every balance equals the sum of its entries",
        f"""SELECT a.id, a.credits_posted - a.debits_posted AS posted,
                  coalesce(e.posted, 0) + coalesce(z.posted_delta_minor, 0) AS entries_posted,
                  a.credits_pending - a.debits_pending AS pending,
                  coalesce(e.pending, 0) + coalesce(z.pending_delta_minor, 0) AS entries_pending
           FROM accounts a
           LEFT JOIN (SELECT account_id, sum(posted_delta_minor) AS posted,
                             sum(pending_delta_minor) AS pending
                      FROM entries GROUP BY account_id) e ON e.account_id = a.id
           LEFT JOIN {_ARCHIVED} z ON z.account_id = a.id
           WHERE a.credits_posted - a.debits_posted
                     <> coalesce(e.posted, 0) + coalesce(z.posted_delta_minor, 0)
              OR a.credits_pending - a.debits_pending
                     <> coalesce(e.pending, 0) + coalesce(z.pending_delta_minor, 0)""",
    ),
    (
        # The database has no foreign keys from transfers to accounts (migration 0010:
        # the engine locks both accounts before it writes a transfer, and the keys cost
        # PostgreSQL a lookup and a row lock per account per transfer), so check here.
        "every transfer's accounts exist, in its currency",
        """SELECT t.id, t.debit_account_id, t.credit_account_id, t.currency
           FROM transfers t
           LEFT JOIN accounts d ON d.id = t.debit_account_id
           LEFT JOIN accounts c ON c.id = t.credit_account_id
           WHERE d.id IS NULL OR c.id IS NULL
              OR d.currency <> t.currency OR c.currency <> t.currency""",
    ),
    (
        "every entry's account exists",
        """SELECT e.account_id, e.id FROM entries e
           LEFT JOIN accounts a ON a.id = e.account_id WHERE a.id IS NULL""",
    ),
    (
        "every account's latest entry shows its balance",
        """SELECT a.id, l.posted_after_minor, l.pending_after_minor
           FROM accounts a
           JOIN LATERAL (SELECT posted_after_minor, pending_after_minor FROM entries
                         WHERE account_id = a.id ORDER BY id DESC LIMIT 1) l ON true
           WHERE l.posted_after_minor <> a.credits_posted - a.debits_posted
              OR l.pending_after_minor <> a.credits_pending - a.debits_pending""",
    ),
    (
        "no user or merchant account spends more than it has",
        """SELECT id, kind, credits_posted, debits_posted, debits_pending FROM accounts
           WHERE NOT overdraft_allowed
             AND debits_posted + debits_pending > credits_posted""",
    ),
    (
        "pending totals equal the open holds",
        """SELECT a.id, a.debits_pending, coalesce(d.open, 0) AS open_debits,
                  a.credits_pending, coalesce(c.open, 0) AS open_credits
           FROM accounts a
           LEFT JOIN (SELECT debit_account_id AS id, sum(amount_minor) AS open FROM transfers
                      WHERE status = 'pending' GROUP BY 1) d ON d.id = a.id
           LEFT JOIN (SELECT credit_account_id AS id, sum(amount_minor) AS open FROM transfers
                      WHERE status = 'pending' GROUP BY 1) c ON c.id = a.id
           WHERE a.debits_pending <> coalesce(d.open, 0)
              OR a.credits_pending <> coalesce(c.open, 0)""",
    ),
    (
        "posted totals equal the posted transfers",
        f"""SELECT a.id, a.debits_posted,
                  coalesce(d.moved, 0) + coalesce(z.transfers_debited_minor, 0)
                      AS transfers_debited,
                  a.credits_posted,
                  coalesce(c.moved, 0) + coalesce(z.transfers_credited_minor, 0)
                      AS transfers_credited
           FROM accounts a
           LEFT JOIN (SELECT debit_account_id AS id, sum(posted_amount_minor) AS moved
                      FROM transfers GROUP BY 1) d ON d.id = a.id
           LEFT JOIN (SELECT credit_account_id AS id, sum(posted_amount_minor) AS moved
                      FROM transfers GROUP BY 1) c ON c.id = a.id
           LEFT JOIN {_ARCHIVED} z ON z.account_id = a.id
           WHERE a.debits_posted
                     <> coalesce(d.moved, 0) + coalesce(z.transfers_debited_minor, 0)
              OR a.credits_posted
                     <> coalesce(c.moved, 0) + coalesce(z.transfers_credited_minor, 0)""",
    ),
    (
        "every transfer is between two accounts of its currency",
        """SELECT t.id FROM transfers t
           LEFT JOIN accounts d ON d.id = t.debit_account_id
           LEFT JOIN accounts c ON c.id = t.credit_account_id
           WHERE d.id IS NULL OR c.id IS NULL
              OR d.currency <> t.currency OR c.currency <> t.currency""",
    ),
    (
        "every entry belongs to a transfer of its account",
        # An entry may outlive its transfer online: a hold posted after its partition's
        # span has its entry in a later partition. Its transfer must then be in archived
        # history (the range of a partition no longer attached).
        """SELECT e.account_id, e.id, e.transfer_id FROM entries e
           LEFT JOIN transfers t ON t.id = e.transfer_id
           WHERE (t.id IS NULL AND NOT EXISTS (
                      SELECT FROM history_partitions h
                      WHERE h.state <> 'attached'
                        AND e.transfer_id >= h.lower_id AND e.transfer_id < h.upper_id))
              OR e.account_id NOT IN (t.debit_account_id, t.credit_account_id)""",
    ),
    (
        "every committed idempotency key carries its answer",
        "SELECT scope, key FROM idempotency_keys WHERE result IS NULL",
    ),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckOutcome:
    name: str
    violations: int
    examples: list[dict[str, object]]


async def reconcile(conn: asyncpg.Connection) -> list[CheckOutcome]:
    """Run every check in one REPEATABLE READ snapshot, so concurrent commits cannot
    make a healthy ledger look broken."""
    outcomes = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # Partitions are not MVCC: one detached by engine.history after this snapshot was
        # taken would vanish from it while its archived totals stay invisible. Holding
        # ACCESS SHARE on every table read makes the detach wait for us (writes do not).
        await conn.execute(
            "LOCK TABLE accounts, transfers, entries, archived_account_totals,"
            " history_partitions IN ACCESS SHARE MODE"
        )
        for name, sql in CHECKS:
            rows = await conn.fetch(sql)
            examples = [dict(row) for row in rows[:VIOLATIONS_SHOWN_MAX]]
            outcomes.append(CheckOutcome(name=name, violations=len(rows), examples=examples))
    return outcomes


async def totals(conn: asyncpg.Connection) -> dict[str, int]:
    """Counts that a reconcile report shows beside its checks."""
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM accounts) AS accounts,
                  (SELECT count(*) FROM transfers) AS transfers,
                  (SELECT count(*) FROM entries) AS entries,
                  (SELECT count(*) FROM transfers WHERE status = 'pending') AS open_holds,
                  (SELECT coalesce(sum(transfers), 0)::bigint FROM history_partitions
                   WHERE state <> 'attached') AS archived_transfers"""
    )
    assert row is not None
    return dict(row)
