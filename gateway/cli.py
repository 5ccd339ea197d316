"""`txengine`: serve, migrate, reconcile, partners, audit.

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
import getpass
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import asyncpg
import uvloop
from aiohttp import web

from engine import Engine, EngineError, audit
from engine import partners as partner_store
from engine.database import EmbeddedPostgres, SchemaNotCurrent, check_schema, migrate
from engine.partners import PartnerError, PartnerStatus, SecretBox
from engine.reconcile import reconcile, totals
from engine.sweeper import Sweeper
from gateway import logs, metrics, signing
from gateway.app import make_app, runner_options
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
        keepalive_timeout=runner_options(settings)["keepalive_timeout"],
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port, backlog=2048)
    await site.start()
    sweeper = Sweeper(engine)
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


def _operator() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a bare container)
        return f"operator:uid-{os.getuid()}"


def _public_key(path: str | None) -> str | None:
    if path is None:
        return None
    pem = Path(path).read_text(encoding="ascii")
    signing.load_public_key(pem)  # refuse a bad key before storing it
    return pem


async def _partners(dsn: str, args: argparse.Namespace, settings: Settings) -> int:
    """`txengine partners ...`: every change is audited in the same transaction.
    Secrets are printed once, here, and nowhere else."""
    conn = await asyncpg.connect(dsn)
    try:
        await check_schema(conn)
        box = SecretBox(settings.master_key())
        actor = _operator()
        if args.action == "create":
            secret = await partner_store.create(
                conn,
                box,
                partner_id=args.partner_id,
                name=args.name or args.partner_id,
                actor=actor,
                public_key_pem=_public_key(args.public_key_file),
                rate_per_s=args.rate_per_s,
                burst=args.burst,
            )
            _print_secret(args.partner_id, secret)
        elif args.action == "rotate":
            secret = await partner_store.rotate(
                conn,
                box,
                partner_id=args.partner_id,
                actor=actor,
                overlap_s=args.overlap_s,
                public_key_pem=_public_key(args.public_key_file),
            )
            _print_secret(args.partner_id, secret)
            print(f"the previous credential stays valid for {args.overlap_s} s")
        elif args.action in ("disable", "enable"):
            status = PartnerStatus.DISABLED if args.action == "disable" else PartnerStatus.ACTIVE
            await partner_store.set_status(
                conn, partner_id=args.partner_id, status=status, actor=actor
            )
            print(f"partner {args.partner_id} {status.value}")
        elif args.action == "limits":
            await partner_store.set_limits(
                conn,
                partner_id=args.partner_id,
                rate_per_s=args.rate_per_s,
                burst=args.burst,
                actor=actor,
            )
            print(f"partner {args.partner_id}: {args.rate_per_s}/s, burst {args.burst}")
        else:
            _print_partners(await partner_store.list_partners(conn))
    except (PartnerError, ValueError) as error:
        print(f"txengine: {error}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    return 0


def _print_secret(partner_id: str, secret: str | None) -> None:
    print(f"partner: {partner_id}")
    if secret is not None:
        print(f"secret: {secret}")
        print("(shown once: store it now; it signs requests with HMAC-SHA256)")
    else:
        print("algorithm: rsa2 (requests are signed with the partner's private key)")


def _print_partners(found: list[partner_store.Partner]) -> None:
    print(
        f"{'id':<24} {'status':<9} {'algorithm':<12} {'rate/s':>8} {'burst':>8} {'keys':>5}  name"
    )
    for p in found:
        print(
            f"{p.id:<24} {p.status.value:<9} {p.algorithm:<12} {p.rate_per_s:>8} "
            f"{p.burst:>8} {p.live_credentials:>5}  {p.name}"
        )


async def _audit(dsn: str, args: argparse.Namespace) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await check_schema(conn)
        entries = await audit.read(conn, limit=args.limit, subject=args.subject)
    finally:
        await conn.close()
    for entry in reversed(entries):  # oldest first, like a log
        details = " ".join(f"{k}={v}" for k, v in entry.details.items())
        print(
            f"{entry.id:>6} {entry.at.isoformat(timespec='seconds')} {entry.actor} "
            f"{entry.action} {entry.subject} {details}".rstrip()
        )
    return 0


def _add_partner_commands(commands: Any) -> None:
    partners = commands.add_parser("partners", help="create, list, rotate, disable partners")
    actions = partners.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a partner; prints its secret once")
    create.add_argument("partner_id", help="lower-case letters, digits, - and _ (its scope)")
    create.add_argument("--name", help="a display name (default: the id)")
    create.add_argument("--public-key-file", help="PEM public key: the partner signs with RSA2")
    create.add_argument("--rate-per-s", type=int, default=partner_store.RATE_PER_S_DEFAULT)
    create.add_argument("--burst", type=int, default=partner_store.BURST_DEFAULT)
    actions.add_parser("list", help="every partner, with its status and limits")
    rotate = actions.add_parser("rotate", help="new credential; the old one lives on a while")
    rotate.add_argument("partner_id")
    rotate.add_argument(
        "--overlap-s",
        type=int,
        default=partner_store.ROTATION_OVERLAP_S_DEFAULT,
        help="how long the previous credential stays valid (0: revoke it now)",
    )
    rotate.add_argument("--public-key-file", help="the new PEM public key of an RSA2 partner")
    for name, text in (("disable", "refuse its requests"), ("enable", "accept them again")):
        actions.add_parser(name, help=text).add_argument("partner_id")
    limits = actions.add_parser("limits", help="change a partner's rate limit")
    limits.add_argument("partner_id")
    limits.add_argument("--rate-per-s", type=int, required=True)
    limits.add_argument("--burst", type=int, required=True)
    audit_parser = commands.add_parser("audit", help="the audit log, oldest of the page first")
    audit_parser.add_argument("--limit", type=int, default=100, choices=range(1, 1001), metavar="N")
    audit_parser.add_argument("--subject", help="only entries about this partner or account")


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
    _add_partner_commands(commands)
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
            if args.command == "partners":
                return uvloop.run(_partners(dsn, args, settings))
            if args.command == "audit":
                return uvloop.run(_audit(dsn, args))
            run = _migrate if args.command == "migrate" else _reconcile
            return uvloop.run(run(dsn))
    except SchemaNotCurrent as error:
        print(f"txengine: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
