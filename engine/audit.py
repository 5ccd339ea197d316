"""The append-only audit log of administrative actions by operators and partners.

The database refuses UPDATE, DELETE and TRUNCATE on `audit_log` (a trigger, migration
0002), so the log cannot be edited by this code or by anyone with the application's
credentials short of dropping the trigger. Entries are written in the same transaction as
the change they record where there is one (partners), so neither exists without the other.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Final

import asyncpg
import orjson

READ_LIMIT_MAX: Final = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str  # "operator:<user>" or "partner:<id>"
    action: str  # "partner.created", "account.opened", ...
    subject: str  # what it was done to: a partner id, an account id
    details: dict[str, Any]


async def append(
    conn: asyncpg.Connection,
    *,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, details) VALUES ($1, $2, $3, $4::jsonb)",
        actor,
        action,
        subject,
        orjson.dumps(details or {}).decode(),
    )


async def read(
    conn: asyncpg.Connection, *, limit: int, subject: str | None = None
) -> list[AuditEntry]:
    """The newest `limit` entries, newest first; only those about `subject` if given."""
    assert 1 <= limit <= READ_LIMIT_MAX, limit
    rows = await conn.fetch(
        """SELECT id, at, actor, action, subject, details::text AS details FROM audit_log
           WHERE $1::text IS NULL OR subject = $1 ORDER BY id DESC LIMIT $2""",
        subject,
        limit,
    )
    return [
        AuditEntry(
            id=row["id"],
            at=row["at"],
            actor=row["actor"],
            action=row["action"],
            subject=row["subject"],
            details=orjson.loads(row["details"]),
        )
        for row in rows
    ]
