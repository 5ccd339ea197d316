"""`txengine`: serve, migrate, reconcile.

`serve` starts the embedded PostgreSQL when TXENGINE_DATABASE_URL is not set, applies or
checks migrations, then runs the gateway in one process or in several processes that
share the port with SO_REUSEPORT, restarting any that dies. On SIGTERM or SIGINT each
worker stops taking requests, finishes and answers the batches in flight, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Final

import asyncpg
import uvloop
from aiohttp import web

from engine import Engine, EngineError
from engine.database import EmbeddedPostgres, SchemaNotCurrent, check_schema, migrate
from engine.reconcile import reconcile, totals
from engine.sweeper import Sweeper
from gateway import logs, metrics
from gateway.app import make_app
from gateway.settings import Settings, from_env

_log = logging.getLogger("txengine.cli")

WORKER_RESTARTS_PER_MINUTE_MAX: Final = 10
DATABASE_WAIT_S_MAX: Final = 60.0
_WORKER_ENV: Final = "TXENGINE_WORKER_INDEX"
# Loop turns from accepting a connection to its request loop waiting for a request.
_ACCEPTED_SETTLE_LOOP_TURNS: Final = 3


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The DSN to use: TXENGINE_DATABASE_URL, or an embedded server run for the duration."""
    if settings.database_url is not None:
        yield settings.database_url
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(data_dir=settings.data_dir / "pg")
    dsn = server.start()
    _log.info("embedded postgresql started", extra={"dsn": dsn, "pid": server.pid})
    try:
        yield dsn
    finally:
        server.stop()
        _log.info("embedded postgresql stopped")


async def prepare_schema(dsn: str, *, auto_migrate: bool) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        if auto_migrate:
            applied = await migrate(conn)
            if applied:
                _log.info("migrations applied", extra={"versions": applied})
        await check_schema(conn)
    finally:
        await conn.close()


async def open_engine(dsn: str, settings: Settings) -> Engine:
    """Open the engine, waiting a bounded time for the database to come up."""
    deadline = time.monotonic() + DATABASE_WAIT_S_MAX
    while True:
        try:
            return await Engine.open(
                dsn, config=settings.engine_config(), observer=metrics.EngineMetrics()
            )
        except EngineError as error:
            if time.monotonic() > deadline:
                raise
            _log.warning("database not ready, retrying: %s", error)
            await asyncio.sleep(1.0)


async def run_worker(dsn: str, settings: Settings, *, reuse_port: bool) -> None:
    engine = await open_engine(dsn, settings)
    runner = web.AppRunner(
        make_app(engine, settings),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port, backlog=2048)
    await site.start()
    sweeper = Sweeper(engine, config=settings.sweeper_config())
    if settings.sweeper:
        sweeper.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log.info("listening", extra={"host": settings.host, "port": settings.port})
    await stop.wait()
    _log.info("shutting down: finishing requests in flight")
    await sweeper.stop()
    # Stop accepting, then let connections accepted just before start reading before the
    # runner closes idle ones. aiohttp drops bytes arriving on a connection it has marked
    # closing, and then waits for that connection's request loop if the loop had not run
    # yet: the request was never answered and shutdown took shutdown_timeout_s.
    await site.stop()
    for _ in range(_ACCEPTED_SETTLE_LOOP_TURNS):
        await asyncio.sleep(0)
    await runner.cleanup()  # close idle connections, wait for handlers in flight, cleanups
    await engine.close()  # every batch already queued is committed and answered
    _log.info("stopped")


def _spawn_worker(index: int, dsn: str, settings: Settings) -> subprocess.Popen[bytes]:
    # The worker reads its settings from the environment: pass on what the command line
    # of `serve` overrode, or the workers would listen on the default address.
    env = {
        **os.environ,
        "TXENGINE_DATABASE_URL": dsn,
        "TXENGINE_HOST": settings.host,
        "TXENGINE_PORT": str(settings.port),
        _WORKER_ENV: str(index),
    }
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker"], env=env)


def supervise(dsn: str, settings: Settings) -> int:
    """Run `settings.workers` worker processes on one port; restart any that dies."""
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    workers = {i: _spawn_worker(i, dsn, settings) for i in range(settings.workers)}
    restarts: list[float] = []
    while not stopping:
        time.sleep(0.2)
        for index, process in list(workers.items()):
            if process.poll() is None or stopping:
                continue
            _log.warning("worker died", extra={"worker": index, "code": process.returncode})
            metrics.mark_process_dead(process.pid)
            restarts = [t for t in restarts if t > time.monotonic() - 60] + [time.monotonic()]
            if len(restarts) > WORKER_RESTARTS_PER_MINUTE_MAX:
                _log.error("workers keep dying; giving up")
                stopping = True
                break
            workers[index] = _spawn_worker(index, dsn, settings)
    for process in workers.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in workers.values():
        try:
            process.wait(timeout=settings.shutdown_timeout_s + 10)
        except subprocess.TimeoutExpired:
            process.kill()
    return 0


def serve(settings: Settings) -> int:
    with database(settings) as dsn:
        uvloop.run(prepare_schema(dsn, auto_migrate=settings.auto_migrate))
        if settings.workers == 1:
            uvloop.run(run_worker(dsn, settings, reuse_port=False))
            return 0
        with tempfile.TemporaryDirectory(prefix="txengine-metrics-") as metrics_dir:
            os.environ[metrics.MULTIPROC_ENV] = metrics_dir
            return supervise(dsn, settings)


def worker(settings: Settings) -> int:
    assert settings.database_url is not None, "the supervisor passes the database URL"
    uvloop.run(run_worker(settings.database_url, settings, reuse_port=True))
    return 0


async def _migrate(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"applied migrations: {applied}" if applied else "schema is current")
    return 0


async def _reconcile(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await check_schema(conn)
        outcomes = await reconcile(conn)
        counts = await totals(conn)
    finally:
        await conn.close()
    print("  ".join(f"{name}={value}" for name, value in counts.items()))
    for outcome in outcomes:
        mark = "ok  " if outcome.violations == 0 else "FAIL"
        print(f"{mark} {outcome.name}: {outcome.violations} violations")
        for example in outcome.examples:
            print(f"       {example}")
    failed = sum(1 for o in outcomes if o.violations)
    print("ledger reconciles" if failed == 0 else f"{failed} checks failed")
    return 0 if failed == 0 else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txengine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the HTTP gateway and the engine")
    serve_parser.add_argument("--host", help="listen address (TXENGINE_HOST)")
    serve_parser.add_argument("--port", type=int, help="listen port (TXENGINE_PORT)")
    serve_parser.add_argument("--workers", type=int, help="processes (TXENGINE_WORKERS)")
    commands.add_parser("worker", help=argparse.SUPPRESS)
    commands.add_parser("migrate", help="apply pending database migrations")
    commands.add_parser("reconcile", help="check every ledger invariant; exit 1 on a failure")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = from_env()
    overrides = {
        name: getattr(args, name)
        for name in ("host", "port", "workers")
        if getattr(args, name, None) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    logs.configure(settings.log_level)
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "worker":
            return worker(settings)
        with database(settings) as dsn:
            run = _migrate if args.command == "migrate" else _reconcile
            return uvloop.run(run(dsn))
    except SchemaNotCurrent as error:
        print(f"txengine: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
