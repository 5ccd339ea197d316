"""Partners' storage: sealed secrets, rotation, the shared rate bucket, nonces, and the
append-only audit log (also through the `txengine partners` and `txengine audit` CLI)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet

from engine import Engine, audit, nonces
from engine import partners as partner_store
from engine.partners import PartnerError, SecretBox
from engine.sweeper import reap_nonces_once

BOX = SecretBox(Fernet.generate_key())
REPO_ROOT = Path(__file__).resolve().parents[2]


async def _create(conn: asyncpg.Connection, partner_id: str = "shop", **kw: object) -> str:
    secret = await partner_store.create(
        conn, BOX, partner_id=partner_id, name=partner_id, actor="operator:t", **kw
    )
    assert secret is not None
    return secret


async def test_secrets_are_stored_sealed(engine: Engine) -> None:
    async with engine.pool.acquire() as conn:
        secret = await _create(conn)
        sealed = await conn.fetchval("SELECT secret_sealed FROM partner_credentials")
        dumped = await conn.fetchval("SELECT string_agg(t::text, ' ') FROM partner_credentials t")
        found = await partner_store.credentials(conn, BOX, "shop")
        with pytest.raises(PartnerError, match="does not decrypt"):
            await partner_store.credentials(conn, SecretBox(Fernet.generate_key()), "shop")
    assert secret.encode() not in sealed and secret not in dumped
    assert found is not None and found.secrets == (secret.encode(),)


async def test_invalid_partners_are_refused(engine: Engine) -> None:
    async with engine.pool.acquire() as conn:
        await _create(conn)
        with pytest.raises(PartnerError, match="exists"):
            await _create(conn)
        with pytest.raises(PartnerError, match="invalid partner"):
            await _create(conn, "Upper Case")
        with pytest.raises(PartnerError, match="rate_per_s"):
            await _create(conn, "zero", rate_per_s=0)
        with pytest.raises(PartnerError, match="no partner"):
            await partner_store.rotate(conn, BOX, partner_id="ghost", actor="operator:t")
        assert await conn.fetchval("SELECT count(*) FROM partners") == 1


async def test_rotation_bounds_the_live_credentials(engine: Engine) -> None:
    async with engine.pool.acquire() as conn:
        secrets = [await _create(conn)]
        for _ in range(4):
            new = await partner_store.rotate(conn, BOX, partner_id="shop", actor="operator:t")
            assert new is not None
            secrets.append(new)
        found = await partner_store.credentials(conn, BOX, "shop")
    assert found is not None
    live = partner_store.LIVE_CREDENTIALS_MAX
    assert found.secrets == tuple(s.encode() for s in reversed(secrets[-live:]))


async def test_the_bucket_grants_at_most_its_tokens(engine: Engine) -> None:
    async with engine.pool.acquire() as conn:
        await _create(conn, rate_per_s=1, burst=10)

    async def lease() -> int:
        async with engine.pool.acquire() as conn:
            return (await partner_store.lease_tokens(conn, "shop", want=3)).granted

    granted = await asyncio.gather(*(lease() for _ in range(8)))
    assert sum(granted) in (10, 11)  # 10 saved, at most one more refilled meanwhile
    async with engine.pool.acquire() as conn:
        empty = await partner_store.lease_tokens(conn, "shop", want=3)
    assert empty.granted == 0 and 0 < empty.retry_after_s <= 1.0


async def test_nonces_are_claimed_once_and_reaped_after_the_window(engine: Engine) -> None:
    book = nonces.NonceBook(engine.dsn)
    book.start()
    try:
        firsts = await asyncio.gather(*(book.claim("shop", f"nonce-{i:012d}") for i in range(50)))
        again = await asyncio.gather(*(book.claim("shop", f"nonce-{i:012d}") for i in range(50)))
        other = await book.claim("other", "nonce-000000000000")
    finally:
        await book.stop()
    assert all(firsts) and not any(again) and other
    async with engine.pool.acquire() as conn:
        await conn.execute(
            """UPDATE partner_nonces SET seen_at = seen_at - $1::interval
               WHERE nonce < 'nonce-000000000010'""",
            timedelta(seconds=nonces.RETENTION_S + 1),
        )
    assert await reap_nonces_once(engine, limit=4) == 4
    assert await reap_nonces_once(engine, limit=100) == 7  # 10 of "shop", 1 of "other"
    assert await reap_nonces_once(engine, limit=100) == 0
    async with engine.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM partner_nonces") == 40


async def test_the_audit_log_is_append_only(engine: Engine) -> None:
    async with engine.pool.acquire() as conn:
        await _create(conn)
        await partner_store.rotate(conn, BOX, partner_id="shop", actor="operator:t")
        await partner_store.set_limits(
            conn, partner_id="shop", rate_per_s=5, burst=5, actor="operator:t"
        )
        entries = await audit.read(conn, limit=10)
        assert [e.action for e in entries] == [
            "partner.limits_changed",
            "partner.rotated",
            "partner.created",
        ]
        for statement in (
            "UPDATE audit_log SET actor = 'someone else'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
        assert await audit.read(conn, limit=10) == entries


def _cli(dsn: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TXENGINE_DATABASE_URL": dsn, "TXENGINE_SECRET_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_partners_cli(dsn: str) -> None:
    key = Fernet.generate_key().decode()
    created = _cli(dsn, key, "partners", "create", "acme", "--name", "Acme", "--rate-per-s", "50")
    assert created.returncode == 0, created.stderr
    secret = next(line for line in created.stdout.splitlines() if line.startswith("secret: "))
    assert len(secret) > 40
    assert _cli(dsn, key, "partners", "create", "acme").returncode == 1
    rotated = _cli(dsn, key, "partners", "rotate", "acme", "--overlap-s", "60")
    assert rotated.returncode == 0 and "secret: sk_" in rotated.stdout
    assert _cli(dsn, key, "partners", "limits", "acme", "--rate-per-s", "9", "--burst", "9")
    assert _cli(dsn, key, "partners", "disable", "acme").returncode == 0
    listed = _cli(dsn, key, "partners", "list").stdout
    assert "acme" in listed and "disabled" in listed and "    9" in listed
    assert secret.split()[1] not in listed
    log = _cli(dsn, key, "audit").stdout
    for action in (
        "partner.created",
        "partner.rotated",
        "partner.limits_changed",
        "partner.disabled",
    ):
        assert action in log
    assert "operator:" in log and secret.split()[1] not in log
