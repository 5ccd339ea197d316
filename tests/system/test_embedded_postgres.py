"""`txengine serve` on its own embedded PostgreSQL restarts it when it dies: kill -9 of
the postmaster, and the server is ready again by itself, with nothing acknowledged lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import pytest

from bench.faults.client import Client
from bench.faults.workload import transfer_body
from engine.database import EmbeddedPostgres
from gateway.signing import Signer
from tests.system.support import (
    REPO_ROOT,
    SYSTEM_PARTNER,
    SYSTEM_SECRET,
    SYSTEM_SECRET_KEY,
    ensure_partner,
    free_port,
)

pytestmark = pytest.mark.slow

READY_TIMEOUT_S: Final = 60.0
EXIT_TIMEOUT_S: Final = 30.0


async def wait_ready(client: Client) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (await client.request("GET", "/readyz", timeout_s=5)).status != 200:
        assert time.monotonic() < deadline, "not ready"
        await asyncio.sleep(0.1)


async def post(client: Client, path: str, body: dict[str, object], key: str) -> dict[str, str]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (answer := await client.request("POST", path, body=body, key=key)).definite:
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.1)
    assert answer.status == 201, answer
    created: dict[str, str] = answer.json()
    return created


def start_serve(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`txengine serve` with no TXENGINE_DATABASE_URL: it runs its embedded PostgreSQL."""
    env = {k: v for k, v in os.environ.items() if k != "TXENGINE_DATABASE_URL"}
    env |= {"TXENGINE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env["TXENGINE_SECRET_KEY"] = SYSTEM_SECRET_KEY  # seals the system-test partner's secret
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--workers", "2"]
    with log_path.open("wb") as log:
        # A session of its own, so that whatever is left of it can be killed as a group.
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def exit_code(server: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while (code := server.poll()) is None:
        assert time.monotonic() < deadline, "serve did not exit on SIGTERM"
        await asyncio.sleep(0.05)
    return code


def embedded_dsn(data_dir: Path) -> str:
    """The DSN of the PostgreSQL `serve` runs on `data_dir`: its port is the fourth line
    of postmaster.pid."""
    port = int((data_dir / "pg" / "postmaster.pid").read_text().splitlines()[3])
    return f"postgresql://postgres@127.0.0.1:{port}/txengine"


async def test_serve_restarts_its_embedded_postgres(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    server = start_serve(data_dir, port, tmp_path / "server.log")
    postgres = EmbeddedPostgres(data_dir=data_dir / "pg")
    try:
        signer = Signer.hmac(SYSTEM_PARTNER, SYSTEM_SECRET)
        async with Client(f"http://127.0.0.1:{port}", signer=signer) as client:
            await wait_ready(client)
            await ensure_partner(embedded_dsn(data_dir))
            kinds = [{"currency": "CNY", "kind": kind} for kind in ("system", "user")]
            bank = (await post(client, "/v1/accounts", kinds[0], "bank"))["id"]
            user = (await post(client, "/v1/accounts", kinds[1], "user"))["id"]
            before = await post(client, "/v1/transfers", transfer_body(bank, user, 5, "a"), "a")

            killed = postgres.pid
            assert killed is not None
            postgres.kill()
            # No manual step: serve starts it again. /readyz may still say 200 in the
            # instant after the kill, so wait for the new postmaster first, then ready.
            deadline = time.monotonic() + READY_TIMEOUT_S
            while postgres.pid in (None, killed):
                assert time.monotonic() < deadline, "serve did not start postgres again"
                await asyncio.sleep(0.1)
            await wait_ready(client)

            after = await post(client, "/v1/transfers", transfer_body(bank, user, 7, "b"), "b")
            read = await client.request("GET", f"/v1/accounts/{user}")
            assert read.json()["balance"]["posted_minor"] == 12
            assert before["id"] != after["id"]
        server.terminate()
        assert await exit_code(server) == 0
        assert not postgres.is_running()  # stopped with the server, not restarted again
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)  # the supervisor and any worker left
        server.wait()
        postgres.stop(mode="immediate")
