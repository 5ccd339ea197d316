"""The headline benchmark, in one command:

    python -m bench.run [--duration-s 20] [--accounts 10000] [--workers 2]
                        [--connections 64] [--scenario even|hot|both]
                        [--skip-pgbench] [--record] [--json-out FILE]

1. Starts an embedded PostgreSQL in bench/.data/pg (wiped first unless --keep-data).
2. Runs pgbench TPC-B (scale 10, 8 clients, prepared statements) for the same duration, as
   the yardstick: what this machine's PostgreSQL does with transactions of about a
   transfer's shape.
3. Starts the server (`python -m gateway.cli serve`, auto-migrating), waits for /readyz,
   creates and funds the accounts, and drives POST /v1/transfers closed-loop with
   bench.loadgen, per scenario: "even" (random pairs) and/or "hot" (every transfer
   credits one merchant account, the worst case for row-lock contention).
4. Stops everything and prints transfers/s next to pgbench tps; --record appends the
   rows to bench/RESULTS.md.

Server, database and load generator share the machine (two cores), so results compare
runs on one kind of machine, not systems in general.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.accounts import Partner, create_partner, setup_accounts, setup_hot_account
from bench.cpu import CpuMeter
from bench.loadgen import LoadResult, format_table, run_load
from bench.pgbench import PgbenchResult, dsn_parts, run_tpcb
from engine.partners import new_master_key

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DATA_DIR = BENCH_DIR / ".data"
RESULTS_FILE = BENCH_DIR / "RESULTS.md"
SERVER_LOG = DATA_DIR / "server.log"

PGBENCH_SCALE = 10
PGBENCH_CLIENTS = 8
PGBENCH_THREADS = 2
# Enough for any run to end without a user account running dry (transfers move 1..5).
INITIAL_MINOR = 100_000_000
READY_TIMEOUT_S = 120.0
READY_POLL_S = 0.25
STOP_TIMEOUT_S = 30.0
LOG_TAIL_CHARS = 4000
SCENARIOS = {"even": ["even"], "hot": ["hot"], "both": ["even", "hot"]}
_SET_BY_BENCH = {
    "TXENGINE_DATABASE_URL",
    "TXENGINE_AUTO_MIGRATE",
    "TXENGINE_HOST",
    "TXENGINE_PORT",
    "TXENGINE_WORKERS",
}


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured lead-in per run")
    p.add_argument("--accounts", type=int, default=10_000, help="user accounts to create")
    p.add_argument("--workers", type=int, default=2, help="server worker processes")
    # A batching engine is fed by many partners at once; 256 open connections is a modest
    # front for a payment gateway (pgbench keeps its 8 clients: its best here).
    p.add_argument("--connections", type=int, default=256, help="closed-loop connections")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="even")
    p.add_argument("--skip-pgbench", action="store_true")
    p.add_argument("--record", action="store_true", help=f"append rows to {RESULTS_FILE.name}")
    p.add_argument("--json-out", type=Path, help="also write everything measured as JSON")
    p.add_argument("--keep-data", action="store_true", help="reuse bench/.data/pg as it is")
    p.add_argument(
        "--server-module",
        default="gateway.cli",
        help="module run as `python -m MODULE serve ...` (bench.fakeserver to test the bench)",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- database


def _start_database(*, fresh: bool) -> Any:
    from engine.database import EmbeddedPostgres

    DATA_DIR.mkdir(exist_ok=True)
    pg_dir = DATA_DIR / "pg"
    if fresh and pg_dir.exists():
        # A postmaster left over from an aborted run may still serve the folder.
        EmbeddedPostgres(data_dir=pg_dir).stop(mode="immediate")
        shutil.rmtree(pg_dir)
    pg = EmbeddedPostgres(data_dir=pg_dir, port=0)
    dsn = pg.start()
    _log(f"postgres up at {dsn}")
    return pg


def _run_pgbench(pg: Any, dsn: str, duration_s: float) -> PgbenchResult:
    _log(f"pgbench TPC-B scale {PGBENCH_SCALE}, {PGBENCH_CLIENTS} clients, {duration_s:g} s")
    result = run_tpcb(
        bin_dir=pg.bin_dir,
        **dsn_parts(dsn),
        scale=PGBENCH_SCALE,
        clients=PGBENCH_CLIENTS,
        threads=PGBENCH_THREADS,
        duration_s=duration_s,
        prepared=True,
    )
    _log(f"pgbench: {result.tps:.0f} tps, latency avg {result.latency_avg_ms:.2f} ms")
    return result


# ----------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# The server seals partner secrets with this key; the bench makes its partner with it.
SECRET_KEY = os.environ.get("TXENGINE_SECRET_KEY") or new_master_key().decode()


def _start_server(module: str, dsn: str, port: int, workers: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TXENGINE_DATABASE_URL=dsn, TXENGINE_AUTO_MIGRATE="1")
    env["TXENGINE_SECRET_KEY"] = SECRET_KEY
    # Also in the environment: worker processes re-read their settings from it, and the
    # command-line flags alone have not always reached them.
    env.update(TXENGINE_HOST="127.0.0.1", TXENGINE_PORT=str(port), TXENGINE_WORKERS=str(workers))
    command = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers)]
    _log(f"starting {' '.join(command[1:])}; log in {SERVER_LOG}")
    with SERVER_LOG.open("wb") as log:
        # Own session, so that a server that will not stop can be killed with its workers.
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _server_log_tail() -> str:
    try:
        return SERVER_LOG.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except FileNotFoundError:
        return ""


async def _wait_ready(base_url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(base_url=base_url, timeout=timeout) as session:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited {server.returncode}:\n{_server_log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get("/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(READY_POLL_S)
    raise RuntimeError(f"server not ready in {READY_TIMEOUT_S:g} s:\n{_server_log_tail()}")


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _log(f"server ignored SIGTERM for {STOP_TIMEOUT_S:g} s; killing its process group")
    # Kill whatever of its group is left: workers that outlived the parent, or all of it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    _log(f"server stopped (exit {server.returncode})")


# ----------------------------------------------------------------------------- load


async def _partner(args: argparse.Namespace, dsn: str) -> Partner:
    if args.server_module != "gateway.cli":
        return ("bench-fake", "x" * 32)  # a stand-in server checks no signature
    return await create_partner(dsn, secret_key=SECRET_KEY)


async def _drive(
    args: argparse.Namespace, port: int, server: Any, dsn: str, *, postgres_pid: int | None
) -> dict[str, LoadResult]:
    """Wait for the server, make the partner and the accounts, and run each scenario's
    closed-loop load, every request signed."""
    base_url = f"http://127.0.0.1:{port}"
    await _wait_ready(base_url, server)
    partner = await _partner(args, dsn)
    t0 = time.monotonic()
    accounts = await setup_accounts(
        base_url, count=args.accounts, initial_minor=INITIAL_MINOR, partner=partner
    )
    _log(f"{len(accounts)} accounts created and funded in {time.monotonic() - t0:.1f} s")
    results: dict[str, LoadResult] = {}
    for scenario in SCENARIOS[args.scenario]:
        hot = await setup_hot_account(base_url, partner=partner) if scenario == "hot" else None
        _log(f"scenario {scenario}: {args.connections} connections, {args.duration_s:g} s")
        meter = CpuMeter({"gateway": [server.pid], "postgres": [postgres_pid or 0]})
        # The meter covers the measured window only: it starts when the warm-up ends.
        starting = asyncio.get_running_loop().call_later(args.warmup_s, meter.start)
        result = await run_load(
            host="127.0.0.1",
            port=port,
            accounts=accounts,
            duration_s=args.duration_s,
            warmup_s=args.warmup_s,
            connections=args.connections,
            hot_account_id=hot,
            partner=partner,
        )
        starting.cancel()
        spent_s, wall_s = meter.stop()
        transfers = result.ok_per_s * wall_s
        CPU_US_PER_TRANSFER[scenario] = {
            name: 1e6 * seconds / transfers if transfers else 0.0
            for name, seconds in spent_s.items()
        }
        CPU_US_PER_TRANSFER[scenario]["loadgen"] = (
            1e6 * result.loadgen_cpu_pct / 100 / result.ok_per_s if result.ok_per_s else 0.0
        )
        print(f"\n== {scenario}\n{format_table(result)}", file=sys.stderr, flush=True)
        results[scenario] = result
    return results


def _run_txengine(
    args: argparse.Namespace, dsn: str, *, postgres_pid: int | None = None
) -> dict[str, LoadResult]:
    port = _free_port()
    server = _start_server(args.server_module, dsn, port, args.workers)
    try:
        with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
            return runner.run(_drive(args, port, server, dsn, postgres_pid=postgres_pid))
    finally:
        _stop_server(server)


def _uvloop_factory() -> Any:
    # The load generator runs in this process; uvloop makes it several times lighter.
    import uvloop

    return uvloop.new_event_loop


# ----------------------------------------------------------------------------- report


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "none"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}+dirty" if dirty else commit


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "workers": args.workers,
        "connections": args.connections,
        "accounts": args.accounts,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "cpus": os.cpu_count(),
        # Server settings changed through the environment, which pass on to the server.
        # Secrets (channel secrets ...) are named, never written.
        "server_env": " ".join(
            f"{k}={'***' if k.endswith('_SECRET') else v}"
            for k, v in sorted(os.environ.items())
            if k.startswith("TXENGINE_") and k not in _SET_BY_BENCH
        ),
    }


# CPU µs per transfer of each part, per scenario, measured over the window (bench/cpu.py):
# what each part costs, and 2 cores ÷ their sum is this code's ceiling on this machine.
CPU_US_PER_TRANSFER: dict[str, dict[str, float]] = {}


def _cpu_lines() -> list[str]:
    lines = []
    for scenario, parts in CPU_US_PER_TRANSFER.items():
        total = sum(parts.values())
        ceiling = (os.cpu_count() or 1) * 1e6 / total if total else 0.0
        lines.append(
            f"{scenario} CPU per transfer: "
            + ", ".join(f"{name} {us:.0f} µs" for name, us in parts.items())
            + f"; total {total:.0f} µs, so {os.cpu_count()} cores carry at most {ceiling:,.0f}/s"
        )
    return lines


def _rows(pgb: PgbenchResult | None, loads: dict[str, LoadResult]) -> list[dict[str, Any]]:
    rows = []
    for scenario, r in loads.items():
        rows.append(
            {
                "scenario": scenario,
                "pgbench_tps": pgb.tps if pgb else None,
                "ok_per_s": r.ok_per_s,
                "ratio": r.ok_per_s / pgb.tps if pgb and pgb.tps else None,
                "p50_ms": r.latency_ms["p50"],
                "p99_ms": r.latency_ms["p99"],
                "errors": r.errors_total,
                "loadgen_cpu_pct": r.loadgen_cpu_pct,
            }
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(
    pgb: PgbenchResult | None, loads: dict[str, LoadResult], settings: dict[str, Any]
) -> str:
    s = settings
    lines = [
        f"txengine benchmark, {s['date']}, commit {s['commit']}, {s['cpus']} cpus",
        f"settings: {s['workers']} workers, {s['connections']} connections, "
        f"{s['accounts']} accounts, {s['duration_s']:g} s (+{s['warmup_s']:g} s warmup)"
        + (f", {s['server_env']}" if s["server_env"] else ""),
        "pgbench TPC-B: "
        + (
            f"{pgb.tps:.0f} tps (scale {pgb.scale}, {pgb.clients} clients, prepared, "
            f"latency avg {pgb.latency_avg_ms:.2f} ms)"
            if pgb
            else "skipped"
        ),
        "",
        f"{'scenario':<9}{'transfers ok/s':>15}{'vs pgbench':>12}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'loadgen cpu':>13}",
    ]
    for row in _rows(pgb, loads):
        lines.append(
            f"{row['scenario']:<9}{row['ok_per_s']:>15.0f}{_fmt(row['ratio'], '.2f'):>12}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['errors']:>8}"
            f"{row['loadgen_cpu_pct']:>12.0f}%"
        )
    lines += _cpu_lines()
    for scenario, r in loads.items():
        if r.errors:
            lines.append(f"{scenario} errors: {r.errors}")
            lines += [f"  {sample}" for sample in r.error_samples]
    return "\n".join(lines)


RESULTS_HEADER = """\
# Benchmark results

Rows are appended by `python -m bench.run --record`. Each run starts a fresh embedded
PostgreSQL (default settings: fsync and synchronous_commit on), runs pgbench TPC-B-like
(scale 10, 8 clients, 2 threads, `-M prepared`) on it for the same duration as the load,
then starts `gateway.cli serve` against it, creates and funds the user accounts, and
drives `POST /v1/transfers` closed-loop from `bench.loadgen` (raw HTTP/1.1 keep-alive,
one request in flight per connection) after a warmup. Server, database and load
generator share one machine, so compare rows from the same kind of machine only.

Columns: **scenario** `even` = random debit/credit pairs among the users, `hot` = every
transfer credits one merchant account; **pgbench tps** = TPC-B transactions/s without
connection time; **ok/s** = transfers answered 201 per second of the measured window;
**ratio** = ok/s ÷ pgbench tps; **p50/p99 ms** = latency over every answered measured
request; **errors** = non-201 answers, connection errors and timeouts; **lg cpu** = the
load generator's CPU as a share of one core; **server env** = TXENGINE_* settings the run
passed to the server beyond the bench's own.

| date | commit | scenario | workers | conns | accounts | duration s | pgbench tps | ok/s \
| ratio | p50 ms | p99 ms | errors | lg cpu | server env |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def record(rows: list[dict[str, Any]], settings: dict[str, Any], path: Path) -> None:
    """Append one Markdown table row per scenario, creating the file with its header."""
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    s = settings
    with path.open("a") as out:
        for row in rows:
            cells = [
                s["date"],
                s["commit"],
                row["scenario"],
                s["workers"],
                s["connections"],
                s["accounts"],
                f"{s['duration_s']:g}",
                _fmt(row["pgbench_tps"], ".0f"),
                f"{row['ok_per_s']:.0f}",
                _fmt(row["ratio"], ".2f"),
                f"{row['p50_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                row["errors"],
                f"{row['loadgen_cpu_pct']:.0f}%",
                s["server_env"] or "-",
            ]
            out.write("| " + " | ".join(str(c) for c in cells) + " |\n")


def _write_json(
    path: Path,
    pgb: PgbenchResult | None,
    loads: dict[str, LoadResult],
    settings: dict[str, Any],
) -> None:
    doc = {
        "settings": settings,
        "pgbench": pgb.to_dict() if pgb else None,
        "scenarios": {name: r.to_dict() for name, r in loads.items()},
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _record_targets(pgb: PgbenchResult | None, loads: dict[str, LoadResult]) -> None:
    """Targets 1 (even scenario vs pgbench) and 3 (hot vs even) in the targets table."""
    from bench.harness import command_line
    from bench.targets import TargetRow, record_target

    command = command_line("bench.run")
    even, hot = loads.get("even"), loads.get("hot")
    if even is not None:
        ratio = even.ok_per_s / pgb.tps if pgb else None
        record_target(
            TargetRow(
                number=1,
                measured=f"{even.ok_per_s:,.0f} transfers/s, p99 {even.latency_ms['p99']:.0f} ms, "
                f"{even.errors_total} errors",
                pgbench_tps=pgb.tps if pgb else None,
                ratio="-" if ratio is None else f"{ratio:.2f}x pgbench",
                met=None if ratio is None else ratio >= 2.0 and even.errors_total == 0,
                command=command,
            )
        )
    if even is not None and hot is not None and even.ok_per_s:
        ratio = hot.ok_per_s / even.ok_per_s
        record_target(
            TargetRow(
                number=3,
                measured=f"{hot.ok_per_s:,.0f} transfers/s hot vs {even.ok_per_s:,.0f} even",
                pgbench_tps=pgb.tps if pgb else None,
                ratio=f"{ratio:.2f}x even",
                met=ratio >= 0.8 and hot.errors_total == 0,
                command=command,
            )
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    settings = _settings(args)
    pg = _start_database(fresh=not args.keep_data)
    try:
        pgb = None if args.skip_pgbench else _run_pgbench(pg, pg.dsn, args.duration_s)
        loads = _run_txengine(args, pg.dsn, postgres_pid=pg.pid)
    finally:
        pg.stop()
    print(format_report(pgb, loads, settings))
    if args.record:
        record(_rows(pgb, loads), settings, RESULTS_FILE)
        _record_targets(pgb, loads)
        _log(f"recorded in {RESULTS_FILE}")
    if args.json_out is not None:
        _write_json(args.json_out, pgb, loads, settings)
    # A benchmark that got errors measured something else than it says: fail it.
    healthy = all(r.requests_ok > 0 and r.errors_total == 0 for r in loads.values())
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
