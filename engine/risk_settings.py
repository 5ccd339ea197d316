"""The operator's side of risk rules: set a kind's defaults or an account's overrides,
freeze and unfreeze, and read them back. The SQL of `txengine risk ...`.

A change takes effect for every batch whose locking statement starts after it commits.
Account settings are columns of the account row, so setting one waits for the batch
holding that account's lock (if any) and is seen by the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import asyncpg

from engine.model import INT64_MAX, AccountKind

# The settable limits, each with its largest value (the column's type); None clears it.
LIMITS: Final = {
    "max_per_transfer_minor": INT64_MAX,
    "daily_outflow_max_minor": INT64_MAX,
    "velocity_max_per_minute": 2**31 - 1,
    "step_up_threshold_minor": INT64_MAX,
}
_MINIMUM: Final = {"max_per_transfer_minor": 1}


class SettingError(ValueError):
    """A limit name or value the tables would refuse."""


def _check(changes: Mapping[str, int | None]) -> None:
    if not changes:
        raise SettingError("name at least one limit to set")
    for name, value in changes.items():
        if name not in LIMITS:
            raise SettingError(f"unknown limit {name!r}")
        if value is not None and not _MINIMUM.get(name, 0) <= value <= LIMITS[name]:
            raise SettingError(f"{name} must be {_MINIMUM.get(name, 0)} to {LIMITS[name]}")


async def set_kind_rules(
    conn: asyncpg.Connection, kind: AccountKind, changes: Mapping[str, int | None], *, now: datetime
) -> dict[str, Any]:
    """Set (or clear, with None) the named defaults of `kind`; return all of them."""
    _check(changes)
    names = list(changes)  # only names from LIMITS reach the SQL text
    assigned = ", ".join(f"{n} = EXCLUDED.{n}" for n in names)
    placeholders = ", ".join(f"${i + 3}" for i in range(len(names)))
    row = await conn.fetchrow(
        f"""INSERT INTO risk_kind_rules (kind, updated_at, {", ".join(names)})
            VALUES ($1, $2, {placeholders})
            ON CONFLICT (kind) DO UPDATE SET updated_at = EXCLUDED.updated_at, {assigned}
            RETURNING kind, {", ".join(LIMITS)}""",
        kind.value,
        now,
        *changes.values(),
    )
    assert row is not None
    return dict(row)


async def set_account_rules(
    conn: asyncpg.Connection, account_id: int, changes: Mapping[str, int | None]
) -> dict[str, Any] | None:
    """Set (or clear, with None: inherit the kind's) the named overrides of one account;
    return all of its settings, or None if there is no such account."""
    _check(changes)
    assigned = ", ".join(f"risk_{n} = ${i + 2}" for i, n in enumerate(changes))
    row = await conn.fetchrow(
        f"UPDATE accounts SET {assigned} WHERE id = $1 RETURNING {_ACCOUNT_SETTINGS}",
        account_id,
        *changes.values(),
    )
    return None if row is None else dict(row)


async def set_frozen(
    conn: asyncpg.Connection, account_id: int, *, frozen: bool
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"UPDATE accounts SET risk_frozen = $2 WHERE id = $1 RETURNING {_ACCOUNT_SETTINGS}",
        account_id,
        frozen,
    )
    return None if row is None else dict(row)


_ACCOUNT_SETTINGS: Final = (
    "id, kind, risk_frozen AS frozen, "
    + ", ".join(f"risk_{n} AS {n}" for n in LIMITS)
    + (
        ", risk_counted_minute AS counted_minute, risk_outflow_day_minor AS outflow_day_minor,"
        " risk_transfers_minute AS transfers_minute"
    )
)


async def account_rules(conn: asyncpg.Connection, account_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(f"SELECT {_ACCOUNT_SETTINGS} FROM accounts WHERE id = $1", account_id)
    return None if row is None else dict(row)


async def kind_rules(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(f"SELECT kind, {', '.join(LIMITS)} FROM risk_kind_rules ORDER BY kind")
    return [dict(row) for row in rows]
