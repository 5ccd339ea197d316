"""The Grafana dashboard (bench/dashboards/txengine.json) reads series txengine really
exposes, and a real Prometheus server scrapes a running txengine and serves them back,
every dashboard expression included."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest

from tests.gateway.support import Api, World

DASHBOARD: Final = Path(__file__).resolve().parents[2] / "bench" / "dashboards" / "txengine.json"
INSTALL_TIMEOUT_S: Final = 600
READY_TIMEOUT_S: Final = 60.0
SCRAPE_INTERVAL_S: Final = 1
_METRIC: Final = re.compile(r"\btxengine_[a-z_]+\b")
_SUFFIXES: Final = {
    "counter": ("", "_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def _expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel["targets"]]


def _exposed(text: str) -> set[str]:
    """Every series name /metrics offers, from its TYPE lines (so labelled counters that
    have not counted anything yet still count as offered) and its samples."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def _traffic(api: Api, world: World, rounds: int) -> None:
    """Transfers that succeed and one that is refused, so results of both kinds exist."""
    for _ in range(rounds):
        assert (await api.move(world.user, world.merchant, 1)).status == 201
    refused = await api.move(world.user, world.merchant, 10**9)
    assert refused.status == 422 and refused.json["code"] == "insufficient_funds"


def test_dashboard_covers_the_issue_panels() -> None:
    doc = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("throughput", "latency", "batch size", "queue depth", "commit", "errors"):
        assert topic in titles, topic
    exprs = " ".join(_expressions())
    assert "histogram_quantile(0.99" in exprs


async def test_every_dashboard_expression_names_an_exposed_metric(api: Api, world: World) -> None:
    await _traffic(api, world, 3)
    reply = await api.get("/metrics")
    assert reply.status == 200
    exposed = _exposed(reply.body.decode())
    for expr in _expressions():
        names = _METRIC.findall(expr)
        assert names, expr
        for name in names:
            assert name in exposed, f"{name} (in {expr}) is not exposed by /metrics"


def test_exposed_parser_knows_an_unknown_name() -> None:
    text = "# TYPE txengine_x counter\ntxengine_x_total 1\n"
    assert "txengine_x_total" in _exposed(text)
    assert "txengine_y_total" not in _exposed(text)


# ----------------------------------------------------------------------------- Prometheus


def _prometheus_binary() -> str:
    """Debian's prometheus, installed now if missing; skip only if it cannot be had."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("prometheus is not installed and apt-get cannot run here (not root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
    ]
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            pytest.skip(f"cannot install prometheus: {done.stderr.decode()[-500:]}")
    found = shutil.which("prometheus")
    if not found:
        pytest.skip("apt-get installed prometheus but no binary is on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _prometheus(target_port: int, folder: Path) -> Iterator[str]:
    binary = _prometheus_binary()
    config = folder / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n  - job_name: txengine\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    )
    port = _free_port()
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def _query(session: aiohttp.ClientSession, base: str, expr: str) -> dict[str, Any]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        doc: dict[str, Any] = await resp.json()
        assert resp.status == 200 and doc["status"] == "success", (expr, doc)
        return doc["data"]


async def _wait_for(
    session: aiohttp.ClientSession, base: str, expr: str, *, keep_busy: Any
) -> list[Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, AssertionError):
            result: list[Any] = (await _query(session, base, expr))["result"]
            if result:
                return result
        await keep_busy()
        await asyncio.sleep(SCRAPE_INTERVAL_S / 2)
    raise AssertionError(f"prometheus never returned {expr}")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def test_prometheus_scrapes_txengine_and_serves_the_dashboard(
    api: Api, world: World, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = api.client.server.port
    assert port is not None

    async def busy() -> None:
        await _traffic(api, world, 5)

    with _prometheus(port, tmp_path) as base:
        up = await _wait_for(http, base, 'up{job="txengine"} == 1', keep_busy=busy)
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        # A series read back: the transfers this test made, counted by route and status.
        series = await _wait_for(
            http,
            base,
            'txengine_http_requests_total{route="/v1/transfers", status="201"} >= 10',
            keep_busy=busy,
        )
        assert float(series[0]["value"][1]) >= 10
        # Rates need two scrapes that saw traffic between them.
        throughput = _expressions()[0].replace("$__rate_interval", "1m")
        rate = await _wait_for(http, base, f"({throughput}) > 0", keep_busy=busy)
        assert float(rate[0]["value"][1]) > 0
        # Every expression of the dashboard is valid PromQL over these series.
        for expr in _expressions():
            data = await _query(http, base, expr.replace("$__rate_interval", "1m"))
            assert data["resultType"] == "vector", expr
        refused = await _query(
            http, base, 'txengine_command_results_total{result="insufficient_funds"}'
        )
        assert refused["result"] and float(refused["result"][0]["value"][1]) >= 1
