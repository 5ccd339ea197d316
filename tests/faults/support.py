"""What the fault tests share: a started cluster (PostgreSQL, the slow proxy, `txengine
serve` with two workers) and requests sent until their answer is definite."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest

from bench.faults.checker import check_reconcile
from bench.faults.client import Answer, Client
from bench.faults.cluster import Cluster
from bench.faults.workload import CURRENCY, transfer_body

DEFINITE_DEADLINE_S: Final = 120.0
READY_TIMEOUT_S: Final = 60.0


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    started = Cluster(workdir=tmp_path / "cluster", workers=2)
    try:
        await started.start()
        yield started
    finally:
        await started.close()


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[Client]:
    async with Client(cluster.url, signer=cluster.signer) as opened:
        assert await cluster.wait_ready(opened, timeout_s=READY_TIMEOUT_S) is not None
        yield opened


async def definite(
    client: Client, path: str, body: dict[str, Any], *, key: str, method: str = "POST"
) -> Answer:
    """Send with the same key until the answer is definite; a 500 fails the test."""
    deadline = time.monotonic() + DEFINITE_DEADLINE_S
    while True:
        answer = await client.request(method, path, body=body, key=key)
        assert answer.status != 500, answer
        if answer.definite:
            return answer
        assert time.monotonic() < deadline, f"no definite answer for {key}: {answer}"
        await asyncio.sleep(0.05)


async def open_accounts(client: Client, *, users: int, funding_minor: int) -> list[str]:
    """User accounts, each funded from one system account."""
    system = await definite(
        client, "/v1/accounts", {"currency": CURRENCY, "kind": "system"}, key="sys"
    )
    ids = []
    for i in range(users):
        body = {"currency": CURRENCY, "kind": "user"}
        user = (await definite(client, "/v1/accounts", body, key=f"user-{i}")).json()["id"]
        funding = transfer_body(system.json()["id"], user, funding_minor, f"fund-{i}")
        assert (await definite(client, "/v1/transfers", funding, key=f"fund-{i}")).status == 201
        ids.append(user)
    return ids


async def reconcile_passes(cluster: Cluster) -> None:
    check = await check_reconcile(cluster.direct_dsn, dict(os.environ))
    assert check.violations == 0, check.examples


async def fetch(cluster: Cluster, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(cluster.direct_dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()
