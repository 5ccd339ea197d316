"""Graceful shutdown on SIGTERM, with batches in the database at that moment: the server
stops taking requests, finishes the batches in flight, answers them, then exits 0.

The database is slowed (through the proxy) so that a batch is surely still in flight when
the signal arrives. Assertions are on outcomes, not timing: every transfer in the ledger
got its 201, every request got an answer or a connection error (none hung), and at least
one request was answered after the signal (a batch was finished, not dropped).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest

from bench.faults.client import Answer, Client
from bench.faults.cluster import Cluster
from bench.faults.workload import transfer_body
from tests.faults.support import fetch, open_accounts, reconcile_passes

pytestmark = pytest.mark.slow

REQUESTS: Final = 40
DELAY_S: Final = 0.15  # per chunk between gateway and PostgreSQL
EXIT_TIMEOUT_S: Final = 40.0
IN_FLIGHT_WAIT_S_MAX: Final = 30.0


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Without the sweeper, nothing but the requests of the test reaches the database,
    so traffic through the proxy shows that a batch of them is in flight."""
    started = Cluster(workdir=tmp_path / "cluster", workers=2, server_env={"TXENGINE_SWEEPER": "0"})
    try:
        await started.start()
        yield started
    finally:
        await started.close()


async def timed(client: Client, key: str, body: dict[str, object]) -> tuple[Answer, float]:
    answer = await client.request("POST", "/v1/transfers", body=body, key=key)
    return answer, time.monotonic()


async def test_sigterm_finishes_and_answers_batches_in_flight(
    cluster: Cluster, client: Client
) -> None:
    users = await open_accounts(client, users=4, funding_minor=1_000)
    assert cluster.proxy is not None
    cluster.proxy.delay_s = DELAY_S
    chunks_before = cluster.proxy.chunks_total
    keys = [f"term-{n}" for n in range(REQUESTS)]
    bodies = {k: transfer_body(users[n % 4], users[(n + 1) % 4], 1, k) for n, k in enumerate(keys)}
    sending = [asyncio.create_task(timed(client, k, bodies[k])) for k in keys]

    # A batch is in the database once the proxy passes traffic on for it.
    deadline = time.monotonic() + IN_FLIGHT_WAIT_S_MAX
    while cluster.proxy.chunks_total == chunks_before:
        assert time.monotonic() < deadline, "no batch reached the database"
        await asyncio.sleep(0.01)
    signalled_at = time.monotonic()
    code = await cluster.stop_server(timeout_s=EXIT_TIMEOUT_S)
    results = dict(zip(keys, await asyncio.gather(*sending), strict=True))
    assert code == 0

    for key, (answer, _) in results.items():
        assert answer.status in (0, 201), (key, answer)
        assert answer.status == 201 or answer.error != "timed out", (key, answer)
    answered_after = [k for k, (a, at) in results.items() if a.status == 201 and at > signalled_at]
    assert answered_after, "no batch in flight was finished and answered after SIGTERM"

    # Stopped taking requests: a new one finds no server, and lands nowhere.
    late_body = transfer_body(users[0], users[1], 1, "late")
    late = await client.request("POST", "/v1/transfers", body=late_body, key="late")
    assert late.status == 0, late

    cluster.proxy.heal()
    rows = await fetch(cluster, "SELECT metadata->>'op' AS op FROM transfers")
    assert "late" not in {row["op"] for row in rows}
    in_ledger = {row["op"] for row in rows} & set(keys)
    acknowledged = {k for k, (a, _) in results.items() if a.status == 201}
    assert in_ledger == acknowledged  # nothing applied without its answer, nothing lost
    await reconcile_passes(cluster)
