"""The load generator counts and times what it claims to, against an in-process server.

The fake server answers POST /v1/transfers like txengine would (201, or 422 for some
bodies) and can be told to delay, stall once, or drop a connection, so the counts and
latencies the generator reports can be checked against what really happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench.accounts import setup_accounts, setup_hot_account
from bench.loadgen import (
    LoadResult,
    TransferRequests,
    intervals,
    merge_results,
    parse_response,
    run_load,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCOUNTS = list(range(1000, 1020))
REJECTED_AMOUNT = 5  # the fake server answers 422 to these, about a fifth of requests


@dataclasses.dataclass
class FakeServer:
    port: int = 0
    delay_s: float = 0.0
    # The first request arriving stall_after_s after the first one waits stall_s.
    stall_after_s: float | None = None
    stall_s: float = 0.0
    first_at: float | None = None
    drop_every: int | None = None  # close the connection instead of answering every Nth
    reject_every: int | None = None  # answer 400 and close (Connection: close) every Nth
    requests: int = 0
    keys: list[str] = dataclasses.field(default_factory=list)
    bodies: list[dict[str, object]] = dataclasses.field(default_factory=list)
    accounts: list[dict[str, object]] = dataclasses.field(default_factory=list)

    async def transfer(self, request: web.Request) -> web.StreamResponse:
        n = self.requests
        self.requests += 1
        now = time.monotonic()
        self.first_at = self.first_at or now
        stall = self.stall_after_s is not None and now - self.first_at >= self.stall_after_s
        body = await request.json()
        self.keys.append(request.headers["Idempotency-Key"])
        self.bodies.append(body)
        if self.drop_every and n % self.drop_every == self.drop_every - 1:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if self.reject_every and n % self.reject_every == self.reject_every - 1:
            response = web.json_response({"title": "bad request"}, status=400)
            response.force_close()  # as aiohttp does after a malformed request
            return response
        if stall:
            self.stall_after_s = None  # once only
            await asyncio.sleep(self.stall_s)
        elif self.delay_s:
            await asyncio.sleep(self.delay_s)
        if body["amount_minor"] == REJECTED_AMOUNT:
            return web.json_response({"title": "insufficient funds"}, status=422)
        return web.json_response({"id": str(n + 1), "status": "posted"}, status=201)

    async def account(self, request: web.Request) -> web.Response:
        body = await request.json()
        account = {"id": str(5000 + len(self.accounts)), **body}
        self.accounts.append(account)
        return web.json_response(account, status=201)


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    app = web.Application()
    app.router.add_post("/v1/transfers", fake.transfer)
    app.router.add_post("/v1/accounts", fake.account)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.port = runner.addresses[0][1]
    try:
        yield fake
    finally:
        await runner.cleanup()


async def _run(server: FakeServer, **kwargs: Any) -> LoadResult:
    """run_load against the fake server: 1 s measured after 0.2 s warmup, 4 connections."""
    defaults: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "accounts": ACCOUNTS,
        "duration_s": 1.0,
        "warmup_s": 0.2,
        "connections": 4,
        "seed": 1,
    }
    return await run_load(**(defaults | kwargs))


def _check_accounting(result: LoadResult, server: FakeServer) -> None:
    assert result.requests_sent == server.requests
    assert len(set(server.keys)) == len(server.keys), "Idempotency-Keys must be unique"
    assert result.requests_ok + result.errors_total == result.requests_measured
    answered = result.errors.get("422", 0) + result.errors.get("400", 0)
    assert len(result.latencies_s) == result.requests_ok + answered


# ----------------------------------------------------------------------------- parsing


def test_parse_response_content_length_and_partial() -> None:
    raw = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX: y\r\n\r\nhello"
    assert parse_response(raw) == (201, len(raw) - 5, len(raw))
    assert parse_response(raw[:-1]) is None
    assert parse_response(raw[:20]) is None
    lower = b"HTTP/1.1 422 Unprocessable\r\ncontent-length: 2\r\n\r\n{}"
    assert parse_response(lower) == (422, len(lower) - 2, len(lower))


def test_parse_response_chunked() -> None:
    raw = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert parse_response(raw) == (500, raw.index(b"3\r\n"), len(raw))
    assert parse_response(raw[:-2]) is None
    assert parse_response(raw + b"HTTP/1.1") == (500, raw.index(b"3\r\n"), len(raw))


def test_requests_are_unique_and_hot_account_is_credited() -> None:
    gen = TransferRequests(
        host="h", port=1, accounts=ACCOUNTS, key_prefix="run", hot_account_id=1000, seed=3
    )
    keys, amounts = set(), set()
    for _ in range(500):
        raw = gen.next()
        head, body = raw.split(b"\r\n\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
        keys.add(head.split(b"Idempotency-Key: ")[1].split(b"\r\n")[0])
        doc = json.loads(body)
        assert doc["credit_account_id"] == "1000" != doc["debit_account_id"]
        assert doc["currency"] == "CNY"
        amounts.add(doc["amount_minor"])
    assert len(keys) == 500
    assert amounts == {1, 2, 3, 4, 5}


# ----------------------------------------------------------------------------- modes


async def test_closed_loop_counts_and_times(server: FakeServer) -> None:
    server.delay_s = 0.02
    result = await _run(server)
    _check_accounting(result, server)
    assert result.mode == "closed"
    # Four connections, 20 ms a request: at most 200 answers a second.
    assert 120 <= result.requests_measured / result.window_s <= 210
    assert 0 < result.errors["422"] < result.requests_ok
    assert set(result.errors) == {"422"}
    assert any("insufficient funds" in s for s in result.error_samples)
    assert 20 <= result.latency_ms["p50"] < 60
    assert result.latency_ms["p50"] <= result.latency_ms["p99"] <= result.latency_ms["max"]
    assert result.loadgen_cpu_s > 0


async def test_open_loop_keeps_the_rate(server: FakeServer) -> None:
    result = await _run(server, rate_per_s=300, connections=8)
    _check_accounting(result, server)
    assert result.mode == "open"
    # 300/s over a 1 s window, give or take the request on the window's edge.
    assert 298 <= result.requests_measured <= 301
    assert result.errors_total == result.errors.get("422", 0)
    # The 0.2 s warmup's 60 requests were sent but not measured.
    assert server.requests - result.requests_measured == pytest.approx(60, abs=2)


async def test_open_loop_times_from_schedule_so_a_stall_shows(server: FakeServer) -> None:
    # One connection at 200/s; 0.5 s in (inside the window) the server stalls 300 ms.
    # Requests due meanwhile wait for the connection and carry that wait.
    server.stall_after_s, server.stall_s = 0.5, 0.3
    result = await _run(server, rate_per_s=200, connections=1, warmup_s=0.1)
    _check_accounting(result, server)
    assert result.latency_ms["max"] >= 300
    assert result.latency_ms["p99"] >= 250  # ~60 queued requests, not one slow outlier
    assert result.latency_ms["p90"] >= 50
    # Those requests were written late, and are counted so.
    assert result.sent_late >= 40
    assert result.send_lag_max_ms >= 250


async def test_open_loop_per_interval_shows_where_the_stall_was(server: FakeServer) -> None:
    server.stall_after_s, server.stall_s = 0.5, 0.3
    result = await _run(server, rate_per_s=200, connections=1, warmup_s=0.1)
    slices = intervals(result, 0.25)
    assert len(slices) == 4
    assert sum(s["answered"] for s in slices) == len(result.latencies_s)
    assert sum(s["errors"] for s in slices) == result.errors_total
    worst = max(range(4), key=lambda i: slices[i]["p99_ms"])
    # The stall starts 0.4 s into the window: its slice, or the next one, carries it.
    assert worst in (1, 2) and slices[worst]["p99_ms"] >= 200
    assert slices[0]["p99_ms"] < 100


async def test_closed_loop_hides_the_same_stall_in_its_tail(server: FakeServer) -> None:
    # The contrast to the open loop: one slow answer, the rest never sent while waiting.
    server.stall_after_s, server.stall_s = 0.5, 0.3
    result = await _run(server, connections=1, warmup_s=0.1)
    assert result.latency_ms["max"] >= 300
    assert result.latency_ms["p90"] < 100


async def test_dropped_connections_count_and_reconnect(server: FakeServer) -> None:
    server.drop_every = 50
    result = await _run(server, connections=2)
    assert result.errors["conn_error"] >= 2
    # Load went on after the drops, over fresh connections.
    assert result.requests_ok > 10 * result.errors["conn_error"]
    assert result.requests_sent == server.requests


async def test_server_closing_after_an_error_is_not_a_connection_error(
    server: FakeServer,
) -> None:
    server.reject_every = 20
    result = await _run(server, connections=2)
    _check_accounting(result, server)
    assert set(result.errors) == {"400", "422"}
    assert result.requests_ok > 5 * result.errors["400"]


async def test_open_loop_backlog_cap_drops(server: FakeServer) -> None:
    server.delay_s = 0.05  # one connection: 20 answers/s against 200 due a second
    result = await _run(
        server, rate_per_s=200, connections=1, outstanding_max=10, drain_timeout_s=2
    )
    assert result.errors["dropped"] > 100
    assert result.requests_measured == pytest.approx(200, abs=2)


# ----------------------------------------------------------------------------- plumbing


def _result(ok: int, lat: list[float], errors: dict[str, int]) -> LoadResult:
    return LoadResult(
        mode="closed",
        connections=2,
        rate_per_s=None,
        duration_s=1.0,
        warmup_s=0.0,
        window_s=1.0,
        requests_sent=ok + sum(errors.values()),
        requests_measured=ok + sum(errors.values()),
        requests_ok=ok,
        errors=errors,
        ok_per_s=ok,
        latency_ms={},
        error_samples=[],
        schedule_lag_max_ms=0.0,
        loadgen_cpu_s=0.5,
        wall_s=1.0,
        latencies_s=array("d", lat),
    )


def test_merge_results_adds_up() -> None:
    merged = merge_results(
        [_result(3, [0.001, 0.002, 0.003], {"422": 1}), _result(1, [0.1], {"422": 1, "500": 2})]
    )
    assert merged.requests_ok == 4
    assert merged.errors == {"422": 2, "500": 2}
    assert merged.connections == 4
    assert merged.processes == 2
    assert merged.latency_ms["max"] == pytest.approx(100)
    assert merged.latency_ms["p50"] == pytest.approx(2)
    assert merged.loadgen_cpu_pct == pytest.approx(100)


async def test_setup_accounts_creates_and_funds(server: FakeServer) -> None:
    base_url = f"http://127.0.0.1:{server.port}"
    users = await setup_accounts(base_url, count=40, initial_minor=777, concurrency=8)
    hot = await setup_hot_account(base_url)
    assert len(set(users)) == 40
    kinds = [a["kind"] for a in server.accounts]
    assert kinds == ["system"] + ["user"] * 40 + ["merchant"]
    system_id = server.accounts[0]["id"]
    funded = {b["credit_account_id"] for b in server.bodies}
    assert funded == {str(u) for u in users}
    assert all(b["debit_account_id"] == system_id for b in server.bodies)
    assert all(b["amount_minor"] == 777 for b in server.bodies)
    assert str(hot) == server.accounts[-1]["id"]


async def test_cli_in_two_processes(server: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(server.port),
        "--accounts",
        ",".join(map(str, ACCOUNTS)),
        "--processes",
        "2",
        "--connections",
        "4",
        "--duration-s",
        "1",
        "--warmup-s",
        "0.2",
        "--json-out",
        str(out),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stdout.decode()
    assert b"throughput ok/s" in stdout
    doc = json.loads(out.read_text())
    assert doc["processes"] == 2
    assert doc["requests_sent"] == server.requests
    assert doc["requests_ok"] > 0
    assert len(set(server.keys)) == len(server.keys)


def test_signed_requests_verify() -> None:
    """With a partner, every request carries signature headers that the gateway's own
    verifier accepts, each with its own nonce."""
    from gateway import signing

    secret = "sk_" + "s" * 40
    gen = TransferRequests(
        host="h", port=1, accounts=ACCOUNTS, key_prefix="run", seed=3, partner=("p1", secret)
    )
    nonces = set()
    for _ in range(50):
        head, body = gen.next().split(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /v1/transfers HTTP/1.1"
        headers = dict(line.split(": ", 1) for line in lines[1:])
        parsed = signing.parse_headers(headers.get)
        message = signing.canonical_request(
            method="POST",
            target="/v1/transfers",
            partner_id=parsed.partner_id,
            timestamp=parsed.timestamp,
            nonce=parsed.nonce,
            idempotency_key=headers["Idempotency-Key"],
            body=body,
        )
        assert signing.verify_hmac([secret.encode()], message, parsed.signature)
        nonces.add(parsed.nonce)
    assert len(nonces) == 50
