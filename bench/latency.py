"""Target 2, latency at a steady load: open loop at a fraction of the maximum.

    python -m bench.latency [--duration-s 20] [--probe-s 10] [--fraction 0.8] [--record]

In one run: pgbench TPC-B on a fresh embedded PostgreSQL, then the server; a closed-loop
probe at 256 connections finds the maximum transfers/s; then an open-loop run sends at
`fraction` of that maximum on a fixed timetable, latency counted from each request's
scheduled time (so a stall shows instead of hiding), and reports p50/p99/p99.9, errors,
and the requests the generator wrote late. Goal: p99 at most 50 ms at 80%.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench import harness
from bench.accounts import setup_accounts
from bench.loadgen import LoadResult, format_table, run_load
from bench.run import INITIAL_MINOR

P99_GOAL_MS = 50.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    harness.add_common_args(p, duration_s=20.0)
    p.add_argument("--probe-s", type=float, default=10.0, help="closed-loop seconds for the max")
    p.add_argument("--fraction", type=float, default=0.8, help="share of the max to send")
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=256, help="closed-loop probe")
    # Open loop needs rate x latency connections at least; more wait idle, cheaply.
    p.add_argument("--open-connections", type=int, default=512)
    return p.parse_args(argv)


async def _measure(
    args: argparse.Namespace, server: harness.Server
) -> tuple[LoadResult, LoadResult]:
    accounts = await setup_accounts(
        server.base_url, count=args.accounts, initial_minor=INITIAL_MINOR, partner=server.partner
    )
    common: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "accounts": accounts,
        "partner": server.partner,
    }
    probe = await run_load(
        **common, duration_s=args.probe_s, warmup_s=args.warmup_s, connections=args.connections
    )
    print(f"\n== closed-loop probe\n{format_table(probe)}", file=sys.stderr, flush=True)
    rate = args.fraction * probe.ok_per_s
    steady = await run_load(
        **common,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        connections=args.open_connections,
        rate_per_s=rate,
    )
    print(f"\n== open loop at {rate:.0f}/s\n{format_table(steady)}", file=sys.stderr, flush=True)
    return probe, steady


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with harness.database() as pg:
        pgb = harness.pgbench(pg, args)
        with harness.serving(pg.dsn, workers=args.workers) as server:
            probe, steady = harness.run_async(_measure(args, server))
    lat = steady.latency_ms
    met = lat["p99"] <= P99_GOAL_MS and steady.errors_total == 0
    print(
        f"txengine latency, {harness.now_utc()}, {harness.machine()}\n"
        f"pgbench TPC-B: {f'{pgb.tps:.0f} tps' if pgb else 'skipped'}\n"
        f"max (closed loop, {args.connections} conns): {probe.ok_per_s:.0f}/s\n"
        f"open loop at {args.fraction:.0%}: {steady.rate_per_s:.0f}/s sent, "
        f"{steady.ok_per_s:.0f}/s ok\n"
        f"latency ms: p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  p99.9 {lat['p999']:.2f}  "
        f"max {lat['max']:.2f}\n"
        f"errors: {steady.errors_total} {steady.errors or ''}\n"
        f"sent late: {steady.sent_late} (max lag {steady.send_lag_max_ms:.2f} ms)\n"
        f"goal p99 <= {P99_GOAL_MS:g} ms: {'met' if met else 'NOT met'}"
    )
    if args.record:
        from bench.targets import TargetRow, record_target

        record_target(
            TargetRow(
                number=2,
                measured=(
                    f"p50 {lat['p50']:.1f} / p99 {lat['p99']:.1f} / p99.9 {lat['p999']:.1f} ms "
                    f"at {steady.rate_per_s:,.0f}/s "
                    f"({args.fraction:.0%} of {probe.ok_per_s:,.0f}/s), "
                    f"{steady.errors_total} errors, {steady.sent_late} sent late"
                ),
                pgbench_tps=pgb.tps if pgb else None,
                ratio=f"{steady.ok_per_s / pgb.tps:.2f}x pgbench" if pgb else "-",
                met=met,
                command=harness.command_line("bench.latency"),
            )
        )
    if args.json_out is not None:
        doc = {
            "pgbench": pgb.to_dict() if pgb else None,
            "probe": probe.to_dict(),
            "steady": steady.to_dict(),
        }
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if steady.requests_ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
