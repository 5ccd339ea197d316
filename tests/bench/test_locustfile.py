"""bench/locustfile.py runs its scenarios against a real server with every body check
passing, and its checks do catch wrong answers.

Locust monkey-patches the standard library (gevent) when imported, so it only ever runs
in a subprocess here, never inside the test process and its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from banksim import BankSimulator, SimConfig
from engine import partners as partner_store
from engine.partners import SecretBox
from engine.reconcile import reconcile
from gateway.routes.channels import BANKS
from gateway.settings import from_env
from tests.gateway.support import TEST_RATE_PER_S, TEST_SECRET_KEY, Api, serving

LOCUSTFILE = Path(__file__).resolve().parents[2] / "bench" / "locustfile.py"
RUN_S = 10
USERS = 16  # enough for every scenario class to get users, by weight


def test_checks_catch_wrong_bodies() -> None:
    code = """
import bench.locustfile as lf
good = {"object": "transfer", "id": "123", "debit_account_id": "1", "credit_account_id": "2",
        "amount_minor": 5, "currency": "CNY", "status": "posted", "posted_amount_minor": 5}
assert lf.is_transfer("1", "2", 5, "posted")(good) is None
assert lf.is_transfer("1", "2", 5, "pending")(good) is not None
assert lf.is_transfer("1", "3", 5, "posted")(good) is not None
assert lf.is_transfer("1", "2", 5, "posted", posted=2)(good) is not None
assert lf.is_transfer("1", "2", 5, "posted")({**good, "id": 123.0}) is not None
assert lf.expect(object="account")({"object": "transfer"}) is not None
assert lf._is_id("id", "hold_id")({"id": "1", "hold_id": "2"}) is None
assert lf._is_id("id", "hold_id")({"id": "1", "hold_id": 2.0}) is not None
assert lf._is_id("id")({}) is not None
conflict = {"type": "/problems/order_state_conflict", "code": "order_state_conflict"}
assert lf._problem("order_state_conflict")(conflict) is None
assert lf._problem("trade_state_conflict")(conflict) is not None
assert lf._all(lf.expect(a=1), lf.expect(b=2))({"a": 1, "b": 3}) is not None
assert lf._all(lf.expect(a=1), lf.expect(b=2))({"a": 1, "b": 2}) is None
print("checks ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "checks ok" in done.stdout, done.stderr[-2000:]


@contextlib.asynccontextmanager
async def served_with_a_bank(dsn: str) -> AsyncIterator[Api]:
    """txengine with its channels pointed at an in-process bank simulator that answers
    fast, failing some top-ups, so top-ups resolve during the run."""
    bank = BankSimulator(SimConfig(latency_ms=20, failure_rate=0.2, seed=1))
    bank_url = await bank.start()
    defaults = from_env()
    channels = {
        name: dataclasses.replace(config, base_url=bank_url)
        for name, config in defaults.channels.items()
    }
    try:
        async with serving(dsn, channels=channels) as api:
            app = api.client.server.app
            app[BANKS].config = dataclasses.replace(
                app[BANKS].config, callback_base_url=str(api.client.make_url(""))
            )
            yield api
    finally:
        await bank.stop()


async def new_partner(api: Api, partner_id: str) -> str:
    """A partner for locust, as `txengine partners create` makes one; its secret."""
    async with api.engine.pool.acquire() as conn:
        secret = await partner_store.create(
            conn,
            SecretBox(TEST_SECRET_KEY.encode()),
            partner_id=partner_id,
            name=partner_id,
            actor="operator:tests",
            rate_per_s=TEST_RATE_PER_S,
            burst=TEST_RATE_PER_S,
        )
    assert secret is not None
    return secret


async def run_locust(
    api: Api, tmp_path: Path, env: dict[str, str], *classes: str
) -> tuple[int, str, str]:
    """Locust headless against the served app: exit code, output, stats CSV."""
    port = api.client.server.port
    # Async, so that this event loop keeps serving the app while locust loads it.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-H", f"http://127.0.0.1:{port}", "-u", str(USERS), "-r", str(USERS), "-t", f"{RUN_S}s",
        "--only-summary", "--csv", str(tmp_path / "run"), *classes,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env},
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), RUN_S + 60)
    assert process.returncode is not None
    csv = tmp_path / "run_stats.csv"
    stats = csv.read_text() if csv.exists() else ""
    return process.returncode, output.decode(errors="replace"), stats


async def test_scenarios_run_clean_against_the_server(dsn: str, tmp_path: Path) -> None:
    async with served_with_a_bank(dsn) as api:
        env = {"PARTNER_ID": "locust", "PARTNER_SECRET": await new_partner(api, "locust")}
        code, text, stats = await run_locust(api, tmp_path, env)
        # Locust exits 1 when any request failed, a body check included.
        assert code == 0, text[-3000:]
        names = ["(p2p)", "(hot merchant)", "(hold)", "/post", "/void"]
        names += ["(precreate)", "/v1/orders/pay", "(again)", "(order payment)"]
        names += ["/v1/trades", "/pay", "/ship", "/confirm", "(trade hold)"]
        names += ["/v1/topups", "/v1/topups/{id}", "/v1/accounts/{id} (top-up)"]
        for name in names:
            assert name in stats, name
        # The money moved as the scenarios said: every wallet, shop and clearing account
        # sums to zero per currency, every hold's entries agree.
        async with api.engine.pool.acquire() as conn:
            outcomes = await reconcile(conn)
            states = {
                row["state"]: row["n"]
                for row in await conn.fetch(
                    "SELECT state, count(*) AS n FROM channel_requests GROUP BY state"
                )
            }
        assert [o.name for o in outcomes if o.violations] == []
        # The bank answered during the run: top-ups resolved, their holds posted or voided.
        assert states.get("succeeded", 0) > 0, states


async def test_unsigned_requests_fail_the_run(api: Api, tmp_path: Path) -> None:
    """Without a partner the run fails (every /v1 request is refused unsigned, or
    signed as a partner txengine does not know): the body checks see it."""
    env = {"PARTNER_ID": "nobody", "PARTNER_SECRET": "x" * 32}
    code, text, _ = await run_locust(api, tmp_path, env, "P2PUser")
    assert code != 0, text[-3000:]
    assert "401" in text, text[-3000:]
