"""bench/locustfile.py runs its scenarios against a real server with every body check
passing, and its checks do catch wrong answers.

Locust monkey-patches the standard library (gevent) when imported, so it only ever runs
in a subprocess here, never inside the test process and its event loop.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tests.gateway.support import Api

LOCUSTFILE = Path(__file__).resolve().parents[2] / "bench" / "locustfile.py"
RUN_S = 6


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
print("checks ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "checks ok" in done.stdout, done.stderr[-2000:]


async def test_scenarios_run_clean_against_the_server(api: Api, tmp_path: Path) -> None:
    port = api.client.server.port
    # Async, so that this event loop keeps serving the app while locust loads it.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-H", f"http://127.0.0.1:{port}", "-u", "12", "-r", "12", "-t", f"{RUN_S}s",
        "--only-summary", "--csv", str(tmp_path / "run"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), RUN_S + 60)
    text = output.decode(errors="replace")
    # Locust exits 1 when any request failed, a body check included.
    assert process.returncode == 0, text[-3000:]
    stats = (tmp_path / "run_stats.csv").read_text()
    for name in ("(p2p)", "(hot merchant)", "(hold)", "/post", "/void"):
        assert name in stats, name
