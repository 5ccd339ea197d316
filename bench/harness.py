"""What every target benchmark sets up: a fresh embedded PostgreSQL in bench/.data, the
pgbench yardstick on it, a `txengine serve` against it, and the facts of the machine.

bench.run (targets 1 and 3) grew these first; the other targets reuse them from here so
that every figure in RESULTS.md is measured the same way, beside pgbench of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.accounts import Partner, create_partner
from bench.cpu import child_pids
from bench.pgbench import PgbenchResult
from bench.run import (
    SECRET_KEY,
    _free_port,
    _git_commit,
    _run_pgbench,
    _start_database,
    _start_server,
    _stop_server,
    _uvloop_factory,
    _wait_ready,
)

__all__ = [
    "Server",
    "add_common_args",
    "children",
    "command_line",
    "database",
    "machine",
    "now_utc",
    "partner",
    "pgbench",
    "rss_kib",
    "run_async",
    "serving",
]


def add_common_args(p: argparse.ArgumentParser, *, duration_s: float) -> None:
    p.add_argument("--duration-s", type=float, default=duration_s, help="measured seconds")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured lead-in")
    p.add_argument("--pgbench-s", type=float, help="pgbench seconds (default: --duration-s)")
    p.add_argument("--skip-pgbench", action="store_true")
    p.add_argument("--record", action="store_true", help="update the targets table in RESULTS.md")
    p.add_argument("--json-out", type=Path, help="also write everything measured as JSON")


@contextlib.contextmanager
def database() -> Iterator[Any]:
    """A fresh embedded PostgreSQL in bench/.data/pg, stopped on the way out."""
    pg = _start_database(fresh=True)
    try:
        yield pg
    finally:
        pg.stop()


def pgbench(pg: Any, args: argparse.Namespace) -> PgbenchResult | None:
    if args.skip_pgbench:
        return None
    return _run_pgbench(pg, pg.dsn, args.pgbench_s or args.duration_s)


@dataclasses.dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    partner: Partner  # every /v1 request is signed as this partner

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        return children(self.process.pid)


@contextlib.contextmanager
def serving(
    dsn: str, *, workers: int, module: str = "gateway.cli", partner: Partner | None = None
) -> Iterator[Server]:
    """`python -m MODULE serve` on a free port, ready when this yields; stopped after.

    The server seals partner secrets with bench.run's SECRET_KEY; `partner` (made with
    `harness.partner(dsn)`) signs the requests, or a new one is made once it is ready."""
    port = _free_port()
    process = _start_server(module, dsn, port, workers)
    try:
        run_async(_wait_ready(f"http://127.0.0.1:{port}", process))
        signer = partner or run_async(create_partner(dsn, secret_key=SECRET_KEY))
        yield Server(port=port, process=process, partner=signer)
    finally:
        _stop_server(process)


async def partner(dsn: str) -> Partner:
    """A partner in `dsn` (migrated) that a server started by `serving` accepts."""
    return await create_partner(dsn, secret_key=SECRET_KEY)


def run_async(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
        return runner.run(coro)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the gateway's workers, under its supervisor)."""
    return sorted(child_pids(pid))


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def machine() -> str:
    """One line: cores, memory, processor, for the record."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    return f"{os.cpu_count()} cpus, {mem_gib:.0f} GiB, {model}"


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line(module: str) -> str:
    return shlex.join([".venv/bin/python", "-m", module, *sys.argv[1:]])


def commit() -> str:
    return _git_commit()
