"""What the system tests share: the server subprocess, HTTP calls that retry until the
answer is definite, and the reconcile command."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from cryptography.fernet import Fernet

from engine import partners as partner_store
from engine.partners import SecretBox
from gateway.signing import Signer, aiohttp_middleware

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS_MAX = 20_000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# The partner every system test signs as, with a secret fixed for the run so that any
# session can sign without knowing which database its server uses.
SYSTEM_PARTNER = "system-tests"
SYSTEM_SECRET_KEY = Fernet.generate_key().decode()
SYSTEM_SECRET = partner_store.new_secret()
SIGNER = Signer.hmac(SYSTEM_PARTNER, SYSTEM_SECRET)
SYSTEM_RATE_PER_S = 1_000_000


def signed_session(**options: Any) -> aiohttp.ClientSession:
    """An aiohttp session whose every request is signed as the system-test partner."""
    return aiohttp.ClientSession(middlewares=(aiohttp_middleware(SIGNER),), **options)


async def ensure_partner(dsn: str) -> None:
    """Create the system-test partner in `dsn` unless it is there already."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT 1 FROM partners WHERE id = $1", SYSTEM_PARTNER):
            return
        await partner_store.create(
            conn,
            SecretBox(SYSTEM_SECRET_KEY.encode()),
            partner_id=SYSTEM_PARTNER,
            name="system tests",
            actor="operator:tests",
            rate_per_s=SYSTEM_RATE_PER_S,
            burst=SYSTEM_RATE_PER_S,
            secret=SYSTEM_SECRET,
        )
    finally:
        await conn.close()


def server_env(dsn: str) -> dict[str, str]:
    return {
        **os.environ,
        "TXENGINE_SECRET_KEY": SYSTEM_SECRET_KEY,
        "TXENGINE_DATABASE_URL": dsn,
        "TXENGINE_AUTO_MIGRATE": "0",
        "TXENGINE_ACCESS_LOG": "0",
        "PYTHONUNBUFFERED": "1",
    }


@dataclasses.dataclass
class ServerProcess:
    dsn: str
    port: int
    workers: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        command = [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"==== {' '.join(command)}\n".encode())
            log.flush()
            # A session of its own: a terminal's Ctrl-C does not reach it, and any worker
            # left behind can be found by its process group, which is ours.
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=server_env(self.dsn),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until every worker answers /readyz: probes on new connections, which
        SO_REUSEPORT spreads over the workers listening, until `workers` pids answered."""
        deadline = time.monotonic() + timeout_s
        ready: set[int] = set()
        connector = aiohttp.TCPConnector(force_close=True)
        timeout = aiohttp.ClientTimeout(total=2)
        async with signed_session(connector=connector, timeout=timeout) as session:
            while len(ready) < self.workers:
                code = self.returncode()
                if code is not None:
                    raise AssertionError(f"server exited with {code} before it was ready")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(ready)} workers ready after {timeout_s} s")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            ready.add((await response.json())["pid"])
                await asyncio.sleep(0.01)

    def returncode(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def send(self, signum: signal.Signals) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)

    async def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """The exit code, once the process has exited; TimeoutError if it does not."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.pid} still running after {timeout_s} s")
            await asyncio.sleep(0.02)
        return code

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, and the exit code."""
        self.send(signal.SIGTERM)
        return await self.wait_exit(timeout_s)

    async def kill(self) -> int:
        self.send(signal.SIGKILL)
        return await self.wait_exit()

    def reap_leftovers(self) -> None:
        """SIGKILL whatever is left of this server's process group (its workers)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_text(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        if len(text) > LOG_TAIL_CHARS_MAX:
            text = "...\n" + text[-LOG_TAIL_CHARS_MAX:]
        return text


StartServer = Callable[..., Awaitable[ServerProcess]]


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


# -- HTTP -------------------------------------------------------------------------------

# Problems that mean "not decided yet: send the same request again with the same key".
RETRY_CODES = frozenset(
    {"idempotency_key_in_flight", "overloaded", "unavailable", "conflict", "outcome_unknown"}
)
RETRY_DEADLINE_S = 30.0
REQUEST_TIMEOUT_S = 15.0
HEALTHZ_PROBES_MAX = 400
CONNECTION_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError)


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    replayed: bool

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        """The problem code of an error answer."""
        if self.status < 400:
            return None
        code: str | None = self.json().get("code")
        return code

    @property
    def definite(self) -> bool:
        return self.code not in RETRY_CODES


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    *,
    key: str,
    client_timeout: aiohttp.ClientTimeout | None = None,
) -> Answer:
    """One POST; connection errors and timeouts propagate."""
    options: dict[str, Any] = {} if client_timeout is None else {"timeout": client_timeout}
    async with session.post(
        url, json=body, headers={"Idempotency-Key": key}, **options
    ) as response:
        data = await response.read()
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        return Answer(status=response.status, body=data, replayed=replayed)


async def post_until_definite(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    *,
    key: str,
    deadline_s: float = RETRY_DEADLINE_S,
) -> Answer:
    """POST with the same key until the answer is neither a retryable problem nor a
    connection error."""
    deadline = time.monotonic() + deadline_s
    backoff_s = 0.005
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    while True:
        try:
            answer = await post(session, url, body, key=key, client_timeout=timeout)
        except TimeoutError:
            # A server that holds a request this long is stuck, not busy.
            raise AssertionError(f"no answer for key {key} in {REQUEST_TIMEOUT_S} s") from None
        except CONNECTION_ERRORS:
            pass
        else:
            if answer.definite:
                return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"no definite answer for key {key} after {deadline_s} s")
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 0.2)


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def healthz_pids(base_url: str, *, want: int) -> set[int]:
    """Pids that answer /healthz, each probe on a new connection, until `want` are seen."""
    pids: set[int] = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with signed_session(connector=connector) as session:
        for _ in range(HEALTHZ_PROBES_MAX // 20):
            probes = [get_json(session, f"{base_url}/healthz") for _ in range(20)]
            for status, body in await asyncio.gather(*probes):
                assert status == 200, body
                pids.add(body["pid"])
            if len(pids) >= want:
                break
    return pids


def transfer_body(debit: str, credit: str, amount_minor: int) -> dict[str, Any]:
    return {
        "debit_account_id": debit,
        "credit_account_id": credit,
        "amount_minor": amount_minor,
        "currency": "CNY",
    }


@dataclasses.dataclass
class Ledger:
    """A system account and user accounts funded from it, made over HTTP."""

    system: str
    users: list[str]
    funded_minor: dict[str, int]
    funding_transfer_ids: list[str]

    @property
    def funded_total_minor(self) -> int:
        return sum(self.funded_minor.values())


async def create_account(session: aiohttp.ClientSession, base_url: str, kind: str) -> str:
    answer = await post_until_definite(
        session,
        f"{base_url}/v1/accounts",
        {"currency": "CNY", "kind": kind},
        key=f"account-{uuid.uuid4()}",
    )
    assert answer.status == 201, answer
    account_id: str = answer.json()["id"]
    return account_id


async def open_ledger(base_url: str, *, users: int, funding_minor: int) -> Ledger:
    async with signed_session() as session:
        system = await create_account(session, base_url, "system")
        user_ids = [await create_account(session, base_url, "user") for _ in range(users)]
        transfer_ids = []
        for user in user_ids:
            answer = await post_until_definite(
                session,
                f"{base_url}/v1/transfers",
                transfer_body(system, user, funding_minor),
                key=f"fund-{uuid.uuid4()}",
            )
            assert answer.status == 201, answer
            transfer_ids.append(answer.json()["id"])
    return Ledger(
        system=system,
        users=user_ids,
        funded_minor=dict.fromkeys(user_ids, funding_minor),
        funding_transfer_ids=transfer_ids,
    )


async def posted_balances(base_url: str, account_ids: list[str]) -> dict[str, int]:
    balances = {}
    async with signed_session() as session:
        for account_id in account_ids:
            status, body = await get_json(session, f"{base_url}/v1/accounts/{account_id}")
            assert status == 200, body
            balances[account_id] = body["balance"]["posted_minor"]
    return balances


def expected_balances(ledger: Ledger, accepted: list[dict[str, Any]]) -> dict[str, int]:
    """Each account's posted balance after the funding and the accepted transfers."""
    balances = {ledger.system: -ledger.funded_total_minor, **ledger.funded_minor}
    for transfer in accepted:
        balances[transfer["debit_account_id"]] -= transfer["amount_minor"]
        balances[transfer["credit_account_id"]] += transfer["amount_minor"]
    return balances


async def check_transfers_exist(base_url: str, accepted: list[dict[str, Any]]) -> None:
    """GET /v1/transfers/{id} shows every acknowledged transfer as it was acknowledged."""
    queue = list(accepted)

    async def reader(session: aiohttp.ClientSession) -> None:
        while queue:
            transfer = queue.pop()
            status, body = await get_json(session, f"{base_url}/v1/transfers/{transfer['id']}")
            assert status == 200, (transfer, body)
            assert body == transfer, (body, transfer)

    async with signed_session() as session:
        await asyncio.gather(*(reader(session) for _ in range(8)))


async def transfer_ids_in_database(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row["id"] for row in await conn.fetch("SELECT id FROM transfers")]
    finally:
        await conn.close()


async def reconcile(dsn: str) -> tuple[int, str]:
    """`python -m gateway.cli reconcile` on `dsn`: its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "reconcile",
        cwd=REPO_ROOT,
        env=server_env(dsn),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")
