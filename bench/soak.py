"""Target 6, a day's peak hour: a long open-loop run at 1,300 transfers/s.

    python -m bench.soak [--duration-s 600] [--rate-per-s 1300] [--interval-s 60] [--record]

In one run: pgbench TPC-B on a fresh embedded PostgreSQL (`--pgbench-s`, 20 s by
default, not the soak's length), then the server, funded accounts, and open-loop load at
a constant rate for `--duration-s`. Every `--interval-s` it prints that slice's answers,
p50/p99 and errors (requests sorted into slices by when they fell due), and the resident
memory of each gateway worker. Goals: no errors; p99 flat (the last slice's p99 at most
max(1.25 x the first's, the first's + 5 ms)); the workers' memory in the last slice
within 10% of the first's. `--duration-s 120` gives a short version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from bench import harness
from bench.accounts import setup_accounts
from bench.loadgen import LoadResult, format_table, intervals, run_load
from bench.run import INITIAL_MINOR

P99_FLAT_FACTOR = 1.25
P99_FLAT_SLACK_MS = 5.0
RSS_GROWTH_MAX = 0.10
FULL_LENGTH_S = 600.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    harness.add_common_args(p, duration_s=FULL_LENGTH_S)
    p.set_defaults(pgbench_s=20.0)
    p.add_argument("--rate-per-s", type=float, default=1300.0)
    p.add_argument("--interval-s", type=float, default=60.0)
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=256)
    return p.parse_args(argv)


async def _sample_rss(
    server: harness.Server, args: argparse.Namespace, samples: list[dict[int, int]]
) -> None:
    """At the end of each slice (after warmup), the RSS in KiB of every gateway worker."""
    await asyncio.sleep(args.warmup_s)
    while True:
        await asyncio.sleep(args.interval_s)
        sizes = {pid: harness.rss_kib(pid) for pid in server.worker_pids()}
        samples.append({pid: kib for pid, kib in sizes.items() if kib is not None})


async def _soak(
    args: argparse.Namespace, server: harness.Server
) -> tuple[LoadResult, list[dict[int, int]]]:
    accounts = await setup_accounts(
        server.base_url, count=args.accounts, initial_minor=INITIAL_MINOR, partner=server.partner
    )
    samples: list[dict[int, int]] = []
    sampler = asyncio.create_task(_sample_rss(server, args, samples))
    try:
        result = await run_load(
            host="127.0.0.1",
            port=server.port,
            accounts=accounts,
            duration_s=args.duration_s,
            warmup_s=args.warmup_s,
            connections=args.connections,
            rate_per_s=args.rate_per_s,
            partner=server.partner,
        )
    finally:
        sampler.cancel()
    print(format_table(result), file=sys.stderr, flush=True)
    return result, samples


def judge(rows: list[dict[str, float]], rss: list[int], errors: int) -> dict[str, Any]:
    """The three goals, from per-slice rows and per-slice total worker RSS."""
    first, last = rows[0]["p99_ms"], rows[-1]["p99_ms"]
    p99_flat = last <= max(P99_FLAT_FACTOR * first, first + P99_FLAT_SLACK_MS)
    rss_change = rss[-1] / rss[0] - 1 if len(rss) >= 2 and rss[0] else None
    rss_ok = rss_change is not None and rss_change <= RSS_GROWTH_MAX
    return {
        "errors": errors,
        "p99_first_ms": first,
        "p99_last_ms": last,
        "p99_flat": p99_flat,
        "rss_first_kib": rss[0] if rss else None,
        "rss_last_kib": rss[-1] if rss else None,
        "rss_change": rss_change,
        "rss_ok": rss_ok,
        "met": errors == 0 and p99_flat and rss_ok,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with harness.database() as pg:
        pgb = harness.pgbench(pg, args)
        with harness.serving(pg.dsn, workers=args.workers) as server:
            result, samples = harness.run_async(_soak(args, server))
    rows = intervals(result, args.interval_s)
    rss = [sum(s.values()) for s in samples][: len(rows)]
    verdict = judge(rows, rss, result.errors_total)
    lines = [
        f"txengine soak, {harness.now_utc()}, {harness.machine()}",
        f"pgbench TPC-B: {f'{pgb.tps:.0f} tps' if pgb else 'skipped'}",
        f"open loop at {args.rate_per_s:g}/s for {args.duration_s:g} s, {args.workers} workers",
        "",
        f"{'from s':>7}{'ok/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'errors':>8}"
        f"{'workers RSS MiB':>17}",
    ]
    for i, row in enumerate(rows):
        size = f"{rss[i] / 1024:.1f}" if i < len(rss) else "-"
        lines.append(
            f"{row['start_s']:>7.0f}{row['per_s']:>9.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
            f"{row['p999_ms']:>10.2f}{row['errors']:>8}{size:>17}"
        )
    change = verdict["rss_change"]
    lines += [
        "",
        f"errors: {result.errors_total} {result.errors or ''}; sent late: {result.sent_late}",
        f"p99 first {verdict['p99_first_ms']:.2f} ms, last {verdict['p99_last_ms']:.2f} ms: "
        + ("flat" if verdict["p99_flat"] else "NOT flat"),
        "workers RSS: "
        + ("-" if change is None else f"{change:+.1%} first to last slice")
        + (" (within 10%)" if verdict["rss_ok"] else " (NOT within 10%)"),
        f"goal: {'met' if verdict['met'] else 'NOT met'}"
        + ("" if args.duration_s >= FULL_LENGTH_S else " (shortened run)"),
    ]
    print("\n".join(lines))
    if args.record:
        from bench.targets import TargetRow, record_target

        record_target(
            TargetRow(
                number=6,
                measured=(
                    f"{args.duration_s / 60:g} min at {result.ok_per_s:,.0f}/s: "
                    f"{result.errors_total} errors, p99 {verdict['p99_first_ms']:.1f} -> "
                    f"{verdict['p99_last_ms']:.1f} ms, RSS "
                    + ("-" if change is None else f"{change:+.1%}")
                ),
                pgbench_tps=pgb.tps if pgb else None,
                ratio=f"{result.ok_per_s / pgb.tps:.2f}x pgbench" if pgb else "-",
                met=verdict["met"] if args.duration_s >= FULL_LENGTH_S else None,
                command=harness.command_line("bench.soak"),
            )
        )
    if args.json_out is not None:
        doc = {
            "pgbench": pgb.to_dict() if pgb else None,
            "load": result.to_dict(),
            "slices": rows,
            "rss_kib": samples,
            "verdict": verdict,
        }
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if result.requests_ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
