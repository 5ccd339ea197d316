"""`txengine`: serve, migrate, reconcile, partners, audit, risk, fees, webhooks secret
create|rotate.

`serve` starts the embedded PostgreSQL when TXENGINE_DATABASE_URL is not set (and starts
it again on the same data directory if it dies), applies or checks migrations, then runs
the gateway in one process or in several processes that share the port with
SO_REUSEPORT, restarting any that dies. On SIGTERM or SIGINT each worker stops taking
requests, finishes and answers the batches in flight, then exits.
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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import asyncpg
import uvloop
from aiohttp import web

from engine import AccountKind, ClientError, Engine, EngineError, audit, risk_settings
from engine import partners as partner_store
from engine.database import (
    EmbeddedPostgres,
    PostgresStartError,
    SchemaNotCurrent,
    check_schema,
    migrate,
)
from engine.engine import utc_now
from engine.ids import NODE_COUNT_MAX, IdGenerator
from engine.partners import PartnerError, PartnerStatus, SecretBox
from engine.products import fees, webhooks
from engine.products.dispatcher import Dispatcher
from engine.reconcile import reconcile, totals
from engine.sweeper import Sweeper
from gateway import logs, metrics, signing
from gateway.app import make_app, runner_options
from gateway.settings import Settings, from_env

_log = logging.getLogger("txengine.cli")

WORKER_RESTARTS_PER_MINUTE_MAX: Final = 10
DATABASE_WAIT_S_MAX: Final = 60.0
POSTGRES_CHECK_INTERVAL_S: Final = 0.5  # how often serve looks whether its PostgreSQL lives
ORPHAN_CHECK_INTERVAL_S: Final = 0.5  # how often a worker looks whether its supervisor lives
_WORKER_ENV: Final = "TXENGINE_WORKER_INDEX"
# Loop turns from accepting a connection to its request loop waiting for a request.
_ACCEPTED_SETTLE_LOOP_TURNS: Final = 3


@contextlib.contextmanager
def database(settings: Settings, *, watch: bool = False) -> Iterator[str]:
    """The DSN to use: TXENGINE_DATABASE_URL, or an embedded server run for the duration.

    With `watch`, an embedded server that dies is started again on its data directory
    (and its port, which it remembers), so the gateways reconnect by themselves.
    """
    if settings.database_url is not None:
        yield settings.database_url
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(data_dir=settings.data_dir / "pg")
    dsn = server.start()
    _log.info("embedded postgresql started", extra={"dsn": dsn, "pid": server.pid})
    watchdog = PostgresWatchdog(server, dsn=dsn) if watch else None
    try:
        yield dsn
    finally:
        if watchdog is not None:
            watchdog.stop()
        server.stop()
        _log.info("embedded postgresql stopped")


class PostgresWatchdog:
    """A thread that restarts the embedded PostgreSQL when it dies (a crash, the OOM
    killer, a kill -9), on the same data directory; crash recovery runs as it starts."""

    def __init__(self, server: EmbeddedPostgres, *, dsn: str) -> None:
        self._server = server
        self._dsn = dsn
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="postgres-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(POSTGRES_CHECK_INTERVAL_S):
            if self._server.is_running():
                continue
            _log.warning("embedded postgresql died; starting it again")
            try:
                dsn = self._server.start()
            except (PostgresStartError, OSError, subprocess.SubprocessError) as error:
                _log.error("embedded postgresql did not start; retrying: %s", error)
                continue
            if dsn != self._dsn:
                # Its port was taken meanwhile: the workers still dial the old one.
                _log.error("embedded postgresql came back on another address; restart txengine")
            _log.info("embedded postgresql started", extra={"dsn": dsn, "pid": self._server.pid})


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
    sweeper = Sweeper(engine, config=settings.sweeper_config())
    if settings.sweeper:
        sweeper.start()
    dispatcher = Dispatcher(engine, observer=metrics.WebhookMetrics())
    if settings.webhooks:
        dispatcher.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A supervised worker outliving its supervisor (kill -9 of serve alone) would go on
    # serving the port beside the workers of the next serve, unsupervised: it stops too.
    orphan_watch = asyncio.create_task(_stop_when_orphaned(stop)) if reuse_port else None
    _log.info("listening", extra={"host": settings.host, "port": settings.port})
    await stop.wait()
    if orphan_watch is not None:
        orphan_watch.cancel()
    _log.info("shutting down: finishing requests in flight")
    await sweeper.stop()
    await dispatcher.stop()  # a send cut short is sent again after its lease
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


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    # Polled: the alternative, prctl(PR_SET_PDEATHSIG) in Popen's preexec_fn, is unsafe in
    # a process with threads, and serve runs one (the PostgreSQL watchdog).
    supervisor = os.getppid()
    while True:
        await asyncio.sleep(ORPHAN_CHECK_INTERVAL_S)
        if os.getppid() != supervisor:
            break
    _log.warning("the supervisor is gone; shutting down")
    stop.set()


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
    with database(settings, watch=True) as dsn:
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


async def _webhook_secret(dsn: str, args: argparse.Namespace) -> int:
    """Create or rotate a partner's webhook secret and print it, once, to stdout."""
    conn = await asyncpg.connect(dsn)
    try:
        await check_schema(conn)
        node = await conn.fetchval("SELECT nextval('id_node_seq')") % NODE_COUNT_MAX
        next_id, now = IdGenerator(node=node), utc_now()
        if args.action == "create":
            secret = await webhooks.create_secret(conn, scope=args.scope, now=now, next_id=next_id)
        else:
            secret = await webhooks.rotate_secret(
                conn, scope=args.scope, now=now, next_id=next_id, overlap_s=args.overlap_s
            )
    except ClientError as error:
        print(f"txengine: {error}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    print(secret)
    return 0


def _webhooks_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("webhooks", help="manage webhook signing secrets")
    secret = parser.add_subparsers(dest="webhooks_command", required=True).add_parser(
        "secret", help="create or rotate a partner scope's secret (printed once)"
    )
    secret.add_argument("action", choices=("create", "rotate"))
    secret.add_argument("--scope", required=True, help="the partner scope")
    secret.add_argument(
        "--overlap-s",
        type=int,
        default=webhooks.SECRET_OVERLAP_S_DEFAULT,
        help="rotate: seconds the old secret keeps signing alongside the new (default a day)",
    )


async def _fees(dsn: str, args: argparse.Namespace) -> int:
    """Set or show a merchant's fee rate (engine/products/fees.py has the rounding rule)."""
    conn = await asyncpg.connect(dsn)
    try:
        await check_schema(conn)
        kind = await conn.fetchval("SELECT kind FROM accounts WHERE id = $1", args.account)
        if kind != AccountKind.MERCHANT:
            print(f"txengine: account {args.account} is not a merchant account", file=sys.stderr)
            return 2
        if args.fees_command == "set":
            await fees.set_rate_bp(conn, args.account, args.rate_bp, now=utc_now())
        rate = await fees.rate_bp(conn, args.account)
    finally:
        await conn.close()
    print(f"account {args.account}: fee rate {rate} bp ({rate / 100:g} %)")
    return 0


def _add_fees_parser(commands: Any) -> None:
    parser = commands.add_parser("fees", help="merchant fee rates, in basis points")
    actions = parser.add_subparsers(dest="fees_command", required=True)
    setter = actions.add_parser("set", help="set a merchant's rate (later settlements use it)")
    setter.add_argument("account", type=int)
    setter.add_argument("rate_bp", type=_rate_bp, help=f"0 to {fees.RATE_BP_MAX} (60 = 0.6 %%)")
    actions.add_parser("show", help="print a merchant's rate").add_argument("account", type=int)


def _rate_bp(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > fees.RATE_BP_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate from 0 to {fees.RATE_BP_MAX}")
    return int(text)


async def _risk(dsn: str, args: argparse.Namespace) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await check_schema(conn)
        return await _risk_command(conn, args)
    except risk_settings.SettingError as error:
        print(f"txengine: {error}", file=sys.stderr)
        return 2
    finally:
        await conn.close()


async def _risk_command(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.risk_command == "show":
        for row in await risk_settings.kind_rules(conn):
            print(_settings_line(row))
        if args.account is not None:
            return _print_account(await risk_settings.account_rules(conn, args.account))
        return 0
    if args.risk_command in ("freeze", "unfreeze"):
        frozen = args.risk_command == "freeze"
        return _print_account(await risk_settings.set_frozen(conn, args.account, frozen=frozen))
    changes = {
        name: getattr(args, name)
        for name in risk_settings.LIMITS
        if getattr(args, name) is not _UNSET
    }
    if args.kind is not None:
        row = await risk_settings.set_kind_rules(
            conn, AccountKind(args.kind), changes, now=utc_now()
        )
        print(_settings_line(row))
        return 0
    return _print_account(await risk_settings.set_account_rules(conn, args.account, changes))


def _print_account(row: dict[str, object] | None) -> int:
    if row is None:
        print("txengine: no such account", file=sys.stderr)
        return 1
    print(_settings_line(row))
    return 0


def _settings_line(row: dict[str, object]) -> str:
    return "  ".join(f"{name}={'-' if value is None else value}" for name, value in row.items())


_UNSET: Final = object()


def _limit(text: str) -> int | None:
    """A limit on the command line: an integer, or `none` to clear it."""
    if text == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or none") from None


def _add_risk_parser(commands: Any) -> None:
    risk = commands.add_parser("risk", help="risk rules: limits, freezing, step-up")
    actions = risk.add_subparsers(dest="risk_command", required=True)
    setter = actions.add_parser(
        "set",
        help="set limits of an account kind (defaults) or of one account (overrides)",
        description="Each limit takes an integer or `none` (for a kind: no limit; for an "
        "account: inherit the kind's). Daily outflow counts per calendar day in UTC.",
    )
    target = setter.add_mutually_exclusive_group(required=True)
    target.add_argument("--kind", choices=[k.value for k in AccountKind])
    target.add_argument("--account", type=int)
    for name in risk_settings.LIMITS:
        setter.add_argument(f"--{name.replace('_', '-')}", type=_limit, default=_UNSET)
    for action in ("freeze", "unfreeze"):
        parser = actions.add_parser(action, help=f"{action} an account")
        parser.add_argument("account", type=int)
    show = actions.add_parser("show", help="print the kinds' rules and an account's")
    show.add_argument("--account", type=int)


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
    _webhooks_parser(commands)
    _add_partner_commands(commands)
    _add_risk_parser(commands)
    _add_fees_parser(commands)
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
            if args.command == "webhooks":
                return uvloop.run(_webhook_secret(dsn, args))
            if args.command == "partners":
                return uvloop.run(_partners(dsn, args, settings))
            if args.command == "audit":
                return uvloop.run(_audit(dsn, args))
            if args.command == "fees":
                return uvloop.run(_fees(dsn, args))
            if args.command == "risk":
                return uvloop.run(_risk(dsn, args))
            run = _migrate if args.command == "migrate" else _reconcile
            return uvloop.run(run(dsn))
    except SchemaNotCurrent as error:
        print(f"txengine: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
