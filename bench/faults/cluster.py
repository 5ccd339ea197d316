"""The system under test, in pieces the nemesis can kill one at a time:

    clients ──HTTP──▶ txengine serve (supervisor + workers) ──▶ SlowProxy ──▶ PostgreSQL

PostgreSQL is an EmbeddedPostgres the harness owns (not the one `serve` would start), so
it can be killed and restarted on its data directory while the gateway keeps running;
the gateway reaches it through the proxy, whose target follows PostgreSQL's port.

Every /v1 request must be signed by a partner: `start` creates the run's partner in the
database (its secret sealed with a master key of the cluster's, which the server gets as
TXENGINE_SECRET_KEY) and `signer` signs as it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import asyncpg
from cryptography.fernet import Fernet

from bench.accounts import create_partner
from bench.cpu import child_pids
from bench.faults.client import Client
from bench.faults.proxy import SlowProxy
from engine.database import EmbeddedPostgres, migrate
from gateway.signing import Signer

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
READY_PROBE_TIMEOUT_S: Final = 5.0
SERVER_EXIT_TIMEOUT_S: Final = 45.0  # SIGTERM: the workers' shutdown_timeout_s and some


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    def __init__(
        self, *, workdir: Path, workers: int, server_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.postgres = EmbeddedPostgres(data_dir=workdir / "pg")
        self.proxy: SlowProxy | None = None
        self._server_env = server_env or {}
        self.secret_key = Fernet.generate_key().decode()  # the server's master key
        self._partner: tuple[str, str] | None = None  # (id, HMAC secret), made by start
        self._server: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()  # every server's process group, for the cleanup
        self.log_path = workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def direct_dsn(self) -> str:
        """PostgreSQL itself, past the proxy: for the checker and the snapshot reader."""
        return self.postgres.dsn

    @property
    def signer(self) -> Signer:
        """Signs requests as the run's partner (created by `start`)."""
        assert self._partner is not None, "start the cluster first"
        return Signer.hmac(*self._partner)

    @property
    def proxy_dsn(self) -> str:
        assert self.proxy is not None
        return f"postgresql://postgres@127.0.0.1:{self.proxy.port}/txengine"

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.postgres.start)
        conn = await asyncpg.connect(self.direct_dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        self._partner = await create_partner(self.direct_dsn, secret_key=self.secret_key)
        self.proxy = SlowProxy(target_host="127.0.0.1", target_port=self.postgres.port)
        await self.proxy.start()
        self.start_server()

    async def close(self) -> None:
        """Stop everything; the server gracefully if it can."""
        with contextlib.suppress(TimeoutError):
            await self.stop_server()
        self.kill_server()
        self._kill_every_group()
        if self.proxy is not None:
            await self.proxy.close()
        await asyncio.to_thread(self.postgres.stop, mode="immediate")

    # -- the server ---------------------------------------------------------------------

    def start_server(self) -> None:
        assert self._server is None or self._server.poll() is not None, "already running"
        command = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", str(self.workers)]
        env = {
            **os.environ,
            "TXENGINE_DATABASE_URL": self.proxy_dsn,
            "TXENGINE_AUTO_MIGRATE": "0",
            "PYTHONUNBUFFERED": "1",
            "TXENGINE_SECRET_KEY": self.secret_key,
            **self._server_env,
        }
        with self.log_path.open("ab") as log:
            log.write(f"==== {' '.join(command)}\n".encode())
            log.flush()
            # A session of its own: the whole server (supervisor and workers) is one
            # process group, which a crash of the machine would take down at once.
            self._server = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._groups.add(self._server.pid)

    @property
    def server_pid(self) -> int | None:
        return None if self._server is None else self._server.pid

    def server_running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def worker_pids(self) -> list[int]:
        if not self.server_running():
            return []
        assert self._server is not None
        return sorted(child_pids(self._server.pid))

    def kill_worker(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def kill_server(self) -> None:
        """SIGKILL the supervisor and every worker at once (its process group)."""
        if self._server is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._server.pid, signal.SIGKILL)
        self._server.wait()

    def kill_supervisor(self) -> None:
        """SIGKILL the supervisor alone; its workers are left to notice."""
        if self._server is None:
            return
        self._server.kill()
        self._server.wait()

    def _kill_every_group(self) -> None:
        """Whatever is left of any server started (orphaned workers included)."""
        for group in self._groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)

    async def stop_server(self, timeout_s: float = SERVER_EXIT_TIMEOUT_S) -> int | None:
        """SIGTERM, and the exit code once it has exited."""
        if self._server is None or self._server.poll() is not None:
            return None if self._server is None else self._server.returncode
        self._server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while (code := self._server.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self._server.pid} did not exit on SIGTERM")
            await asyncio.sleep(0.05)
        return code

    # -- PostgreSQL ---------------------------------------------------------------------

    async def kill_postgres(self) -> None:
        await asyncio.to_thread(self.postgres.kill)

    async def start_postgres(self) -> None:
        await asyncio.to_thread(self.postgres.start)
        assert self.proxy is not None
        self.proxy.target_port = self.postgres.port  # a restart may have had to move

    # -- probes -------------------------------------------------------------------------

    async def wait_ready(self, client: Client, *, timeout_s: float) -> float | None:
        """Seconds until /readyz answers 200, or None if it did not within timeout_s."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            answer = await client.request("GET", "/readyz", timeout_s=READY_PROBE_TIMEOUT_S)
            if answer.status == 200:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        return None
