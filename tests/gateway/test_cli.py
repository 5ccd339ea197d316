"""`txengine risk ...` and `txengine fees ...`: the operator's commands, against a real database."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway import cli


async def run(dsn: str, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setenv("TXENGINE_DATABASE_URL", dsn)
    # In a thread: the command runs its own event loop, as it does from a shell.
    return await asyncio.to_thread(cli.main, ["risk", *argv])


async def test_risk_commands_set_kind_defaults_account_overrides_and_freezing(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO accounts (id, currency, kind, overdraft_allowed, scope, created_at)
               VALUES (42, 'CNY', 'user', false, 'public', now())"""
        )
        assert (
            await run(
                dsn,
                monkeypatch,
                "set",
                "--kind",
                "user",
                "--daily-outflow-max-minor",
                "500",
                "--velocity-max-per-minute",
                "10",
            )
            == 0
        )
        assert (
            await run(
                dsn, monkeypatch, "set", "--kind", "user", "--velocity-max-per-minute", "none"
            )
            == 0
        )
        row = await conn.fetchrow("SELECT * FROM risk_kind_rules WHERE kind = 'user'")
        assert (row["daily_outflow_max_minor"], row["velocity_max_per_minute"]) == (500, None)
        assert (
            await run(
                dsn, monkeypatch, "set", "--account", "42", "--step-up-threshold-minor", "1000"
            )
            == 0
        )
        assert await run(dsn, monkeypatch, "freeze", "42") == 0
        row = await conn.fetchrow("SELECT * FROM accounts WHERE id = 42")
        assert row["risk_step_up_threshold_minor"] == 1000 and row["risk_frozen"]
        assert await run(dsn, monkeypatch, "unfreeze", "42") == 0
        assert not await conn.fetchval("SELECT risk_frozen FROM accounts WHERE id = 42")
        capsys.readouterr()
        assert await run(dsn, monkeypatch, "show", "--account", "42") == 0
        shown = capsys.readouterr().out
        assert "kind=user" in shown and "daily_outflow_max_minor=500" in shown
        assert "step_up_threshold_minor=1000" in shown and "frozen=False" in shown
        # Refused, and nothing changed: an unknown account, a value out of range, no limit.
        assert await run(dsn, monkeypatch, "freeze", "43") == 1
        assert (
            await run(dsn, monkeypatch, "set", "--account", "42", "--max-per-transfer-minor", "0")
            == 2
        )
        assert await run(dsn, monkeypatch, "set", "--kind", "merchant") == 2
        assert await conn.fetchval("SELECT count(*) FROM risk_kind_rules") == 1
        assert await conn.fetchval("SELECT risk_max_per_transfer_minor FROM accounts") is None
    finally:
        await conn.close()


async def test_fees_commands_set_and_show_a_merchants_rate(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TXENGINE_DATABASE_URL", dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO accounts (id, currency, kind, overdraft_allowed, scope, created_at)
               VALUES (7, 'CNY', 'merchant', false, 'public', now()),
                      (8, 'CNY', 'user', false, 'public', now())"""
        )
        assert await asyncio.to_thread(cli.main, ["fees", "set", "7", "60"]) == 0
        assert "fee rate 60 bp (0.6 %)" in capsys.readouterr().out
        assert await conn.fetchval("SELECT rate_bp FROM merchant_fees WHERE account_id = 7") == 60
        assert await asyncio.to_thread(cli.main, ["fees", "show", "7"]) == 0
        assert "60 bp" in capsys.readouterr().out
        # A user account has no fee; a rate past 100 % is refused before anything is written.
        assert await asyncio.to_thread(cli.main, ["fees", "set", "8", "60"]) == 2
        with pytest.raises(SystemExit):
            cli.main(["fees", "set", "7", "10001"])
        assert await conn.fetchval("SELECT count(*) FROM merchant_fees") == 1
    finally:
        await conn.close()
