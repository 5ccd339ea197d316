"""Top-ups and withdrawals through the bank simulator, end to end, with failures on.

    .venv/bin/python -m bench.channels --requests 2000 --concurrency 64 \
        --failure-rate 0.1 --silence-rate 0.02 --duplicate-rate 0.05

Starts its own embedded PostgreSQL (bench/.data/channels-pg), a bank simulator and
txengine in this process, sends the requests over HTTP, waits for every one to end (a
callback, or the deadline for what the bank never answers), then checks that each user's
balance is exactly what the outcomes say and that the ledger reconciles. A figure for
the channel path, not the headline: the simulator and the client share this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from banksim import BankSimulator, SimConfig
from bench.accounts import create_partner
from engine import Engine
from engine.partners import new_master_key
from engine.products import channels
from engine.reconcile import reconcile
from gateway.app import make_app
from gateway.routes.channels import BANKS
from gateway.settings import from_env
from gateway.signing import Signer, aiohttp_middleware

DATA_DIR: Final = Path(__file__).parent / ".data" / "channels-pg"
FUNDS_MINOR: Final = 10_000_000  # each user's starting balance
_HEADERS: Final = {"Content-Type": "application/json"}
# The server seals partner secrets with this key; the run makes its partner with it.
SECRET_KEY: Final = new_master_key().decode()


@dataclasses.dataclass
class Run:
    session: aiohttp.ClientSession
    base_url: str
    keys: int = 0

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.keys += 1
        headers = {**_HEADERS, "Idempotency-Key": f"bench-{self.keys}"}
        async with self.session.post(self.base_url + path, json=body, headers=headers) as reply:
            return reply.status, await reply.json(content_type=None)

    async def get(self, path: str) -> dict[str, Any]:
        async with self.session.get(self.base_url + path) as reply:
            body: dict[str, Any] = await reply.json(content_type=None)
            return body


@contextlib.asynccontextmanager
async def _serving(dsn: str, bank_url: str, deadline_s: int) -> AsyncIterator[tuple[Engine, str]]:
    engine = await Engine.open(dsn)
    settings = from_env()
    settings = dataclasses.replace(
        settings,
        secret_key=SECRET_KEY,
        channels={
            name: dataclasses.replace(config, base_url=bank_url, deadline_s=deadline_s)
            for name, config in settings.channels.items()
        },
    )
    app = make_app(engine, settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base_url = f"http://127.0.0.1:{port}"
    banks = app[BANKS]
    banks.config = dataclasses.replace(banks.config, callback_base_url=base_url)
    try:
        yield engine, base_url
    finally:
        await runner.cleanup()
        await engine.close()


async def _users(run: Run, count: int) -> list[str]:
    _, house = await run.post("/v1/accounts", {"currency": "CNY", "kind": "system"})
    users = []
    for _ in range(count):
        _, user = await run.post("/v1/accounts", {"currency": "CNY", "kind": "user"})
        body = {
            "debit_account_id": house["id"],
            "credit_account_id": user["id"],
            "amount_minor": FUNDS_MINOR,
            "currency": "CNY",
        }
        await run.post("/v1/transfers", body)
        users.append(user["id"])
    return users


def _percentile_ms(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 2)


async def run_channels(
    dsn: str, *, requests: int, concurrency: int, sim: SimConfig, deadline_s: int, seed: int = 1
) -> dict[str, Any]:
    """Send `requests` top-ups and withdrawals, wait for them all to end, check the books."""
    bank = BankSimulator(sim)
    bank_url = await bank.start()
    rng = random.Random(seed)
    try:
        async with _serving(dsn, bank_url, deadline_s) as (engine, base_url):
            partner = await create_partner(dsn, secret_key=SECRET_KEY)
            signed = (aiohttp_middleware(Signer.hmac(*partner)),)
            async with aiohttp.ClientSession(middlewares=signed) as session:
                run = Run(session=session, base_url=base_url)
                users = await _users(run, concurrency)
                gate = asyncio.Semaphore(concurrency)
                latencies: list[float] = []
                made: list[tuple[str, str, str]] = []  # kind, id, user

                async def one(i: int) -> None:
                    user = users[i % len(users)]
                    kind = "topup" if rng.random() < 0.5 else "withdrawal"
                    names = ["ebank", "card", "postal"] + (["cash"] if kind == "topup" else [])
                    body: dict[str, Any] = {
                        "account_id": user,
                        "amount_minor": rng.randint(1, 10_000),
                        "currency": "CNY",
                        "channel": rng.choice(names),
                    }
                    if kind == "withdrawal":
                        body["destination"] = "6222020200112233"
                    async with gate:
                        started = time.perf_counter()
                        status, answer = await run.post(f"/v1/{kind}s", body)
                        latencies.append(time.perf_counter() - started)
                    assert status == 201, answer
                    made.append((kind, answer["id"], user))

                started = time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(requests)))
                posted_s = time.perf_counter() - started
                await bank.idle(timeout_s=60 + sim.latency_ms / 1000)
                answered_s = time.perf_counter() - started
                # The last request's deadline: what is still pending then, the bank
                # never answered (or answered too late), and the deadline job ends it.
                await asyncio.sleep(max(0.0, posted_s + deadline_s - answered_s) + 0.2)
                timed_out = 0
                while fired := await channels.time_out_once(engine, now=engine.clock(), limit=500):
                    timed_out += fired
                states: Counter[str] = Counter()
                expected = dict.fromkeys(users, FUNDS_MINOR)
                for kind, request_id, user in made:
                    view = await run.get(f"/v1/{kind}s/{request_id}")
                    states[f"{kind}.{view['state']}"] += 1
                    if view["state"] == "succeeded":
                        sign = 1 if kind == "topup" else -1
                        expected[user] += sign * view["amount_minor"]
                balances_ok = True
                for user in users:
                    balance = (await run.get(f"/v1/accounts/{user}"))["balance"]
                    balances_ok &= balance == {
                        "posted_minor": expected[user],
                        "pending_minor": 0,
                        "available_minor": expected[user],
                    }
            async with engine.pool.acquire() as conn:
                violations = sum(o.violations for o in await reconcile(conn))
    finally:
        await bank.stop()
    return {
        "requests": requests,
        "concurrency": concurrency,
        "requests_per_s": round(requests / posted_s, 1),
        "request_p50_ms": _percentile_ms(latencies, 0.5),
        "request_p99_ms": _percentile_ms(latencies, 0.99),
        "all_answered_s": round(answered_s, 2),
        "timed_out": timed_out,
        "states": dict(sorted(states.items())),
        "bank": dict(bank.stats),
        "balances_ok": balances_ok,
        "violations": violations,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.channels", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--failure-rate", type=float, default=0.1)
    parser.add_argument("--silence-rate", type=float, default=0.02)
    parser.add_argument("--duplicate-rate", type=float, default=0.05)
    parser.add_argument("--deadline-s", type=int, default=5, help="every channel's deadline")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from engine.database import EmbeddedPostgres, migrate

    args = _parse_args(argv)
    if DATA_DIR.exists():
        EmbeddedPostgres(data_dir=DATA_DIR).stop(mode="immediate")
        shutil.rmtree(DATA_DIR)
    DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(data_dir=DATA_DIR, port=0)
    dsn = server.start()
    sim = SimConfig(
        latency_ms=args.latency_ms,
        failure_rate=args.failure_rate,
        silence_rate=args.silence_rate,
        duplicate_rate=args.duplicate_rate,
        seed=args.seed,
    )

    async def go() -> dict[str, Any]:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return await run_channels(
            dsn,
            requests=args.requests,
            concurrency=args.concurrency,
            sim=sim,
            deadline_s=args.deadline_s,
            seed=args.seed,
        )

    try:
        result = asyncio.run(go())
    finally:
        server.stop(mode="immediate")
    print(json.dumps(result, indent=2))
    return 0 if result["balances_ok"] and result["violations"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
