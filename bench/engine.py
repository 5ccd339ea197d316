"""Target 4, the engine alone: transfers through engine.Engine's Python API, no HTTP.

    python -m bench.engine [--duration-s 20] [--processes 1] [--submitters 4000]
                           [--batch-size-max 2000] [--record]

In one run: pgbench TPC-B on a fresh embedded PostgreSQL; the schema migrated and
`--accounts` funded users loaded straight into the tables (bench.history); then
`--processes` processes, each with its own Engine (its own lanes and connections), each
running `--submitters` coroutines that submit one transfer after another, every one with
its own idempotency key, as the gateway does. Many submitters keep the lanes' batches full;
several processes use more than one core. Counts the transfers answered OK whose
submission started inside the measured window. Goal: at least 4x pgbench TPC-B.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench import harness
from bench.history import load_history
from bench.loadgen import latency_summary_ms
from engine import CreateTransfers, Engine, EngineConfig, Idempotency, LaneConfig, TransferSpec
from engine.database import migrate

GOAL_RATIO = 4.0
START_DELAY_S = 3.0  # spawned processes import and connect before the common start
SCOPE = "public"
FINGERPRINT = bytes(32)  # keys are never retried here, so one fingerprint serves all


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    harness.add_common_args(p, duration_s=20.0)
    p.add_argument("--accounts", type=int, default=10_000)
    # Measured on 2 cores (RESULTS.md): one process with deep batches beat two processes,
    # whose four lanes lock overlapping accounts and wait for each other.
    p.add_argument("--processes", type=int, default=1, help="each with its own Engine")
    p.add_argument("--submitters", type=int, default=4000, help="concurrent submits a process")
    p.add_argument("--lanes", type=int, default=2, help="lanes per Engine")
    p.add_argument("--batch-size-max", type=int, default=2000)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    return p.parse_args(argv)


async def _prepare(dsn: str, accounts: int) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        now = datetime.now(UTC)
        loaded = await load_history(
            conn,
            users=accounts,
            transfers=accounts,
            start=now - timedelta(hours=2),
            end=now - timedelta(hours=1),
        )
        return loaded.user_ids
    finally:
        await conn.close()


async def _submit_for(share: dict[str, Any]) -> dict[str, Any]:
    config = EngineConfig(
        lanes=share["lanes"],
        lane=LaneConfig(
            batch_size_max=share["batch_size_max"], batch_wait_ms=share["batch_wait_ms"]
        ),
    )
    engine = await Engine.open(share["dsn"], config=config)
    accounts: list[int] = share["accounts"]
    rng = random.Random(share["seed"])
    prefix = share["prefix"]
    counter = iter(range(10**12))
    ok = errors = 0
    latencies: list[float] = []
    samples: list[str] = []
    await asyncio.sleep(max(0.0, share["start_at"] - time.time()))
    t_start = time.perf_counter()
    t_measure = t_start + share["warmup_s"]
    t_end = t_measure + share["duration_s"]
    cpu0 = time.process_time()

    async def submitter() -> None:
        nonlocal ok, errors
        while (t0 := time.perf_counter()) < t_end:
            debit, credit = rng.sample(accounts, 2)
            command = CreateTransfers(
                transfers=(
                    TransferSpec(
                        debit_account_id=debit,
                        credit_account_id=credit,
                        amount_minor=rng.randint(1, 5),
                        currency="CNY",
                    ),
                ),
                scope=SCOPE,
            )
            key = Idempotency(scope=SCOPE, key=f"{prefix}-{next(counter)}", fingerprint=FINGERPRINT)
            try:
                result = await engine.submit(command, idempotency=key)
                good, detail = result.ok, str(result.code)
            except Exception as exc:  # an engine error is a measured error, not a crash
                good, detail = False, repr(exc)
            if t0 >= t_measure:
                latencies.append(time.perf_counter() - t0)
                if good:
                    ok += 1
                else:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(detail)

    try:
        await asyncio.gather(*(submitter() for _ in range(share["submitters"])))
    finally:
        cpu_s = time.process_time() - cpu0
        await engine.close()
    return {
        "ok": ok,
        "errors": errors,
        "samples": samples,
        "latencies": latencies,
        "cpu_s": cpu_s,
        "window_s": max(share["duration_s"], time.perf_counter() - t_measure),
    }


def _process_main(share: dict[str, Any]) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_submit_for(share))


def run_engine_load(dsn: str, accounts: list[int], args: argparse.Namespace) -> dict[str, Any]:
    start_at = time.time() + START_DELAY_S
    shares = [
        {
            "dsn": dsn,
            "accounts": accounts,
            "seed": i,
            "prefix": f"eng{i}-{int(start_at)}",
            "start_at": start_at,
            "warmup_s": args.warmup_s,
            "duration_s": args.duration_s,
            "submitters": args.submitters,
            "lanes": args.lanes,
            "batch_size_max": args.batch_size_max,
            "batch_wait_ms": args.batch_wait_ms,
        }
        for i in range(args.processes)
    ]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.processes, mp_context=ctx) as pool:
        parts = list(pool.map(_process_main, shares))
    latencies = [x for part in parts for x in part["latencies"]]
    window_s = max(part["window_s"] for part in parts)
    ok = sum(part["ok"] for part in parts)
    return {
        "ok": ok,
        "ok_per_s": ok / window_s,
        "errors": sum(part["errors"] for part in parts),
        "error_samples": [s for part in parts for s in part["samples"]][:5],
        "latency_ms": latency_summary_ms(latencies),
        "cpu_s": sum(part["cpu_s"] for part in parts),
        "window_s": window_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with harness.database() as pg:
        pgb = harness.pgbench(pg, args)
        accounts = harness.run_async(_prepare(pg.dsn, args.accounts))
        result = run_engine_load(pg.dsn, accounts, args)
    ratio = result["ok_per_s"] / pgb.tps if pgb else None
    lat = result["latency_ms"]
    met = None if ratio is None else ratio >= GOAL_RATIO and result["errors"] == 0
    print(
        f"txengine engine alone, {harness.now_utc()}, {harness.machine()}\n"
        f"pgbench TPC-B: {f'{pgb.tps:.0f} tps' if pgb else 'skipped'}\n"
        f"{args.processes} processes x {args.submitters} submitters, {args.lanes} lanes each, "
        f"batch <= {args.batch_size_max}, wait {args.batch_wait_ms:g} ms\n"
        f"transfers ok/s: {result['ok_per_s']:.0f}"
        + (f" = {ratio:.2f}x pgbench" if ratio is not None else "")
        + f"\nlatency ms: p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}\n"
        f"errors: {result['errors']} {result['error_samples'] or ''}\n"
        f"client+engine cpu: {result['cpu_s']:.1f} s over {result['window_s']:.1f} s\n"
        f"goal >= {GOAL_RATIO:g}x pgbench: "
        + ("skipped" if met is None else "met" if met else "NOT met")
    )
    if args.record:
        from bench.targets import TargetRow, record_target

        record_target(
            TargetRow(
                number=4,
                measured=f"{result['ok_per_s']:,.0f} transfers/s, {result['errors']} errors",
                pgbench_tps=pgb.tps if pgb else None,
                ratio=f"{ratio:.2f}x pgbench" if ratio is not None else "-",
                met=met,
                command=harness.command_line("bench.engine"),
            )
        )
    if args.json_out is not None:
        doc = {"pgbench": pgb.to_dict() if pgb else None, "engine": result, "args": vars(args)}
        args.json_out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0 if result["ok"] > 0 and result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
