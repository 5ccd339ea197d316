"""Fixtures of the system tests: the real server, started as a subprocess.

`start_server(workers=N)` starts `python -m gateway.cli serve` on the test's database (a
test may start several, one after another, on the same database), waits until /readyz
answers and hands back a `ServerProcess` (tests/system/support.py) that the test can stop
gracefully (SIGTERM) or kill (SIGKILL). Whatever is still running when the test ends gets
SIGTERM and must exit 0; leftovers get SIGKILL. Each server writes its stdout and stderr
to a log file, and the logs are attached to the report of a failed test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import pytest

from tests.system.support import ServerProcess, StartServer, ensure_partner, free_port

_SERVERS = pytest.StashKey[list[ServerProcess]]()


@pytest.fixture
async def start_server(
    request: pytest.FixtureRequest, dsn: str, tmp_path: Path
) -> AsyncIterator[StartServer]:
    """`await start_server(workers=N)`: a ready server on this test's database.

    `port=` starts it on a known port (a restart); `database=` serves another DSN.
    """
    servers: list[ServerProcess] = []
    request.node.stash[_SERVERS] = servers

    async def start(
        *, workers: int = 1, port: int | None = None, database: str | None = None
    ) -> ServerProcess:
        server = ServerProcess(
            dsn=database or dsn,
            port=port or free_port(),
            workers=workers,
            log_path=tmp_path / f"server-{len(servers)}.log",
        )
        servers.append(server)
        await ensure_partner(server.dsn)
        server.start()
        await server.wait_ready()
        return server

    try:
        yield start
    finally:
        errors = []
        for server in servers:
            if server.process is None or server.returncode() is not None:
                server.reap_leftovers()
                continue
            try:
                code = await server.stop()
            except TimeoutError as error:
                errors.append(str(error))
            else:
                if code != 0:
                    errors.append(f"server {server.pid} exited with {code} on SIGTERM")
            server.reap_leftovers()
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()
        assert not errors, errors


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for server in item.stash.get(_SERVERS, []):
            report.sections.append((f"server log {server.log_path.name}", server.log_text()))
    return report
