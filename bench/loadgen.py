"""A light HTTP/1.1 keep-alive load generator for txengine's POST /v1/transfers.

The benchmark machine has two cores and the server under test wants most of them, so the
load generator has to cost far less per request than the server does. That rules out an
HTTP client library on the hot path: requests are assembled from pre-encoded bytes, answers
are parsed only as far as the status line and the body length, and everything runs from
`asyncio.Protocol` callbacks without a task or future per request. One request is in flight
per connection (no pipelining), like a real client pool.

Two modes:

* closed loop (`rate_per_s=None`): each connection sends its next request as soon as the
  previous answer arrives, so the offered load adapts to the server. Latency runs from the
  moment a request is written.
* open loop (`rate_per_s=R`): requests are due on a fixed timetable, whether or not answers
  come back. Latency runs from the *scheduled* time, so a request that waited for a free
  connection carries that wait and a server stall shows up in the tail instead of being
  hidden (no coordinated omission). Requests wait in a FIFO when all connections are busy;
  beyond `outstanding_max` waiting or in flight they are dropped and counted as errors
  under "dropped", because by then the server is hopelessly behind.

A request belongs to the measured window when its latency origin (send or scheduled time)
falls in [start + warmup_s, start + warmup_s + duration_s). Requests still unanswered
`drain_timeout_s` after the window closes count as "timeout" errors.

Run `python -m bench.loadgen --help` for the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import random
import sys
import time
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, cast

from bench.accounts import Partner, parse_account_ids, setup_accounts, setup_hot_account
from gateway.signing import Signer

OK_STATUS = 201
# Transfers are small so that the funded balances last through long runs.
AMOUNT_MINOR_MIN = 1
AMOUNT_MINOR_MAX = 5
# Distinct request bodies prepared up front; a power of two so a mask picks one.
BODY_RING_SIZE = 1 << 16
ERROR_SAMPLES_MAX = 5
ERROR_SAMPLE_CHARS_MAX = 300
TICK_MIN_S = 0.001
# Open loop: a request written this long after its scheduled time counts as sent late
# (a free connection was lacking, or the generator itself fell behind).
LATE_SEND_S = 0.005
RECONNECT_ATTEMPTS_MAX = 20
RECONNECT_BACKOFF_S = 0.1
# Spawned workers need time to import and connect before a common start.
PROCESS_START_DELAY_S = 1.5
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))

_perf = time.perf_counter

__all__ = [
    "LoadResult",
    "TransferRequests",
    "format_table",
    "merge_results",
    "parse_account_ids",
    "parse_response",
    "run_load",
    "run_load_processes",
    "run_load_sync",
    "setup_accounts",
    "setup_hot_account",
]


class ProtocolError(Exception):
    """The server sent something this minimal parser does not handle."""


# ----------------------------------------------------------------------------- requests


class TransferRequests:
    """Produces POST /v1/transfers requests as bytes, cheaply.

    Bodies (random accounts and amount) are encoded once into a ring; per request only the
    Idempotency-Key counter is formatted in, which keeps every request unique, and, for a
    `partner`, the signature headers (gateway/signing.py; the nonce is the key prefix and
    the counter): about 5 µs a request, mostly the HMAC.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        accounts: Sequence[int],
        key_prefix: str,
        hot_account_id: int | None = None,
        currency: str = "CNY",
        seed: int | None = None,
        partner: Partner | None = None,
    ) -> None:
        debits = [a for a in accounts if a != hot_account_id]
        if len(debits) < (1 if hot_account_id is not None else 2):
            raise ValueError("need at least two accounts (one besides the hot account)")
        rng = random.Random(seed)
        self._head = (
            f"POST /v1/transfers HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\n"
        ).encode()
        self._key_prefix = key_prefix
        self._key = f"Idempotency-Key: {key_prefix}-".encode()
        self._bodies = [
            _encode_body(_pick_pair(rng, debits, hot_account_id), rng, currency)
            for _ in range(BODY_RING_SIZE)
        ]
        self._tails = [b"\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b) for b in self._bodies]
        self._mask = BODY_RING_SIZE - 1
        self._signer = None if partner is None else Signer.hmac(*partner)
        self.count = 0

    def next(self) -> bytes:
        n = self.count
        self.count = n + 1
        i = n & self._mask
        signature = b"" if self._signer is None else self._sign(n, self._bodies[i])
        return b"%s%s%s%d%s" % (self._head, signature, self._key, n, self._tails[i])

    def _sign(self, n: int, body: bytes) -> bytes:
        assert self._signer is not None
        headers = self._signer.headers(
            "POST",
            "/v1/transfers",
            body,
            timestamp=int(time.time()),
            nonce=f"{self._key_prefix}-{n:015d}",
            idempotency_key=f"{self._key_prefix}-{n}",
        )
        return "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()


def _pick_pair(rng: random.Random, debits: Sequence[int], hot: int | None) -> tuple[int, int]:
    if hot is not None:
        return rng.choice(debits), hot
    debit, credit = rng.sample(debits, 2)
    return debit, credit


def _encode_body(pair: tuple[int, int], rng: random.Random, currency: str) -> bytes:
    amount = rng.randint(AMOUNT_MINOR_MIN, AMOUNT_MINOR_MAX)
    # Ids go as decimal strings, as the gateway wants: 63-bit ids overflow JSON numbers
    # in clients that read them as doubles.
    return (
        f'{{"debit_account_id":"{pair[0]}","credit_account_id":"{pair[1]}",'
        f'"amount_minor":{amount},"currency":"{currency}"}}'
    ).encode()


# ----------------------------------------------------------------------------- responses


def parse_response(buf: bytes) -> tuple[int, int, int] | None:
    """Find the first complete response in `buf`: (status, body_start, end), or None.

    Only what framing needs is read: the status code, Content-Length, or chunk sizes.
    """
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    status = int(buf[9:12])
    body_start = head_end + 4
    # aiohttp spells the header this way; fall back to a case-blind search for others.
    i = buf.find(b"\nContent-Length:", 0, head_end)
    head = b""
    if i < 0:
        head = buf[:head_end].lower()
        i = head.find(b"\ncontent-length:")
    if i >= 0:
        end = body_start + int(buf[i + 16 : buf.find(b"\r", i + 16)])
        return (status, body_start, end) if len(buf) >= end else None
    if b"\ntransfer-encoding: chunked" in head:
        chunked_end = _chunked_end(buf, body_start)
        return None if chunked_end is None else (status, body_start, chunked_end)
    if status < 200 or status in (204, 304):
        return status, body_start, body_start
    raise ProtocolError(f"response without length: {buf[:head_end]!r}")


def _chunked_end(buf: bytes, pos: int) -> int | None:
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(buf[pos:line_end].split(b";", 1)[0], 16)
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", line_end)
            return None if trailer_end < 0 else trailer_end + 4
        pos = line_end + 2 + size + 2
        if pos > len(buf):
            return None


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.t0 = 0.0  # latency origin of the request in flight: send or scheduled time
        self.in_flight = False
        self.lost_reason = ""
        self.closing = False  # the server said it will close: send nothing more here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, t0: float) -> None:
        assert self.transport is not None
        self.t0 = t0
        self.in_flight = True
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while buf:
            try:
                parsed = parse_response(buf)
            except (ProtocolError, ValueError) as exc:
                # Framing is lost; connection_lost reports the request and reconnects.
                self.buf = b""
                self.lost_reason = f"protocol_error: {exc}"
                if self.transport is not None:
                    self.transport.abort()
                return
            if parsed is None:
                break
            status, body_start, end = parsed
            body = None
            if status != OK_STATUS:
                body = buf[body_start:end]
                # Servers may close after an error answer (aiohttp does after a 400); only
                # then is the header looked for, so the common path stays cheap.
                self.closing = b"\nconnection: close" in buf[:body_start].lower()
            buf = buf[end:]
            self.run.on_response(self, status, body)
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.run.on_lost(self, self.lost_reason or repr(exc))


# ----------------------------------------------------------------------------- one run


class _Run:
    """State of one load run; every connection callback lands here."""

    def __init__(
        self,
        *,
        requests: TransferRequests,
        host: str,
        port: int,
        open_loop: bool,
        outstanding_max: int,
    ) -> None:
        self.requests = requests
        self.host = host
        self.port = port
        self.open_loop = open_loop
        self.outstanding_max = outstanding_max
        self.t_measure = math.inf
        self.t_end = math.inf
        self.lat = array("d")  # seconds, one per answered measured request
        self.lat_at = array("d")  # when each of those was due, seconds into the window
        self.error_at = array("d")  # when each measured error was due, likewise
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []
        self.unmeasured = 0  # answers to warmup requests
        self.sent = 0
        self.in_flight = 0
        self.pending: deque[float] = deque()  # open loop: scheduled times awaiting a connection
        self.idle: list[_Conn] = []
        self.conns: set[_Conn] = set()
        self.scheduling = open_loop  # the open-loop ticker is still issuing requests
        self.reconnecting = 0
        self.stopped = False
        self.last_answer = 0.0
        # Open loop: how late the ticker got to a due request, the generator's own lag.
        self.schedule_lag_max_s = 0.0
        # Open loop: measured requests written LATE_SEND_S or more after they fell due,
        # and the worst such delay (a wait for a free connection included).
        self.sent_late = 0
        self.send_lag_max_s = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tasks: set[asyncio.Task[None]] = set()

    def measured(self, t0: float) -> bool:
        return self.t_measure <= t0 < self.t_end

    async def connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        self.conns.add(conn)
        return conn

    def send(self, conn: _Conn, t0: float) -> None:
        self.in_flight += 1
        self.sent += 1
        if self.open_loop and self.t_measure <= t0 < self.t_end:
            lag = _perf() - t0
            if lag >= LATE_SEND_S:
                self.sent_late += 1
            if lag > self.send_lag_max_s:
                self.send_lag_max_s = lag
        conn.send(self.requests.next(), t0)

    def on_response(self, conn: _Conn, status: int, body: bytes | None) -> None:
        if not conn.in_flight:
            return  # unsolicited (say a 408 before the server closes): answers nothing of ours
        now = _perf()
        t0 = conn.t0
        conn.in_flight = False
        self.in_flight -= 1
        if self.t_measure <= t0 < self.t_end:
            self.lat.append(now - t0)
            self.lat_at.append(t0 - self.t_measure)
            self.last_answer = now
            if status == OK_STATUS:
                self.ok += 1
            else:
                self.error(str(status), body, t0)
        else:
            self.unmeasured += 1
        self.dispatch(conn, now)

    def dispatch(self, conn: _Conn, now: float) -> None:
        """Give a free connection its next request, or park it."""
        if self.stopped:
            return
        if conn.closing:
            # Let it close; connection_lost brings a replacement that carries on.
            if conn.transport is not None:
                conn.transport.close()
            return
        if self.pending:
            self.send(conn, self.pending.popleft())  # oldest first: it has waited longest
        elif not self.open_loop and now < self.t_end:
            self.send(conn, now)
        else:
            self.idle.append(conn)
            self.check_done()

    def issue(self, t_sched: float) -> None:
        """Open loop: a request falls due at t_sched."""
        if self.idle:
            self.send(self.idle.pop(), t_sched)
        elif self.in_flight + len(self.pending) < self.outstanding_max:
            self.pending.append(t_sched)
        elif self.measured(t_sched):
            self.error("dropped", None, t_sched)

    def error(self, key: str, detail: bytes | str | None, t0: float) -> None:
        self.errors[key] += 1
        self.error_at.append(t0 - self.t_measure)
        if detail is not None and len(self.samples) < ERROR_SAMPLES_MAX:
            if isinstance(detail, bytes):
                detail = detail[:ERROR_SAMPLE_CHARS_MAX].decode("utf-8", "replace")
            self.samples.append(f"{key}: {detail[:ERROR_SAMPLE_CHARS_MAX]}")

    def check_done(self) -> None:
        busy = self.in_flight or self.pending or self.scheduling or self.reconnecting
        if not busy and not self.done.done():
            self.done.set_result(None)

    def on_lost(self, conn: _Conn, reason: str) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.in_flight:
            conn.in_flight = False
            self.in_flight -= 1
            if self.measured(conn.t0):
                key = "protocol_error" if reason.startswith("protocol_error") else "conn_error"
                self.error(key, reason, conn.t0)
            else:
                self.unmeasured += 1
        if not self.stopped:
            self.spawn(self.reconnect())
        self.check_done()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        # Keep a reference so the task is not collected mid-flight.
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reconnect(self) -> None:
        self.reconnecting += 1
        try:
            for _ in range(RECONNECT_ATTEMPTS_MAX):
                if self.stopped or (_perf() >= self.t_end and not self.pending):
                    return
                try:
                    conn = await self.connect()
                except OSError:
                    await asyncio.sleep(RECONNECT_BACKOFF_S)
                    continue
                if self.stopped and conn.transport is not None:
                    conn.transport.close()
                self.dispatch(conn, _perf())
                return
        finally:
            self.reconnecting -= 1
            self.check_done()

    async def tick(self, t_start: float, rate_per_s: float) -> None:
        """Open loop: issue requests on a fixed timetable until the window closes."""
        interval_s = 1.0 / rate_per_s
        n = 0
        try:
            while not self.stopped:
                now = _perf()
                t_next = t_start + n * interval_s
                # Catch up on everything already due: a late wake-up must not thin the load.
                if t_next <= now and self.measured(t_next):
                    self.schedule_lag_max_s = max(self.schedule_lag_max_s, now - t_next)
                while t_next <= now and t_next < self.t_end:
                    self.issue(t_next)
                    n += 1
                    t_next = t_start + n * interval_s
                if t_next >= self.t_end:
                    return
                # Event-loop timers are millisecond-grained (uvloop rounds shorter sleeps to
                # zero and would spin), so wake at most once a millisecond and send in bursts.
                await asyncio.sleep(max(t_next - now, TICK_MIN_S))
        finally:
            self.scheduling = False
            self.check_done()

    async def finish(self, drain_timeout_s: float) -> None:
        """Wait for the window to close and answers to drain, then close every connection."""
        timeout_s = max(0.0, self.t_end - _perf()) + drain_timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done, timeout_s)
        self.stopped = True
        for conn in list(self.conns):
            if conn.in_flight:
                conn.in_flight = False
                self.in_flight -= 1
                if self.measured(conn.t0):
                    self.error("timeout", None, conn.t0)
            if conn.transport is not None:
                conn.transport.close()
        for t_sched in self.pending:
            if self.measured(t_sched):
                self.error("timeout", None, t_sched)
        self.pending.clear()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.sleep(0)  # let the transports run connection_lost


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class LoadResult:
    """What one run measured. Latencies cover every answered measured request, any status."""

    mode: str  # "closed" or "open"
    connections: int
    rate_per_s: float | None
    duration_s: float
    warmup_s: float
    window_s: float  # duration_s, stretched if answers to measured requests came later
    requests_sent: int  # written to the wire, warmup included
    requests_measured: int  # due in the window: ok + every error kind
    requests_ok: int
    errors: dict[str, int]
    ok_per_s: float
    latency_ms: dict[str, float]  # p50, p90, p99, p999, max, mean
    error_samples: list[str]
    # Open loop: the worst delay between a request falling due and the generator issuing
    # it; a large value means the generator, not the server, fell behind.
    schedule_lag_max_ms: float
    loadgen_cpu_s: float  # CPU (user + system) the load generator spent while loading
    wall_s: float
    processes: int = 1
    latencies_s: array[float] = dataclasses.field(
        default_factory=lambda: array("d"), repr=False, compare=False
    )
    # Open loop: measured requests written LATE_SEND_S or more after falling due.
    sent_late: int = 0
    send_lag_max_ms: float = 0.0
    # Seconds into the window at which each latency sample, and each error, fell due.
    latency_at_s: array[float] = dataclasses.field(
        default_factory=lambda: array("d"), repr=False, compare=False
    )
    error_at_s: array[float] = dataclasses.field(
        default_factory=lambda: array("d"), repr=False, compare=False
    )

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def loadgen_cpu_us_per_request(self) -> float:
        return 1e6 * self.loadgen_cpu_s / self.requests_sent if self.requests_sent else 0.0

    @property
    def loadgen_cpu_pct(self) -> float:
        """Share of one core the load generator used, summed over its processes."""
        return 100.0 * self.loadgen_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["latencies_s"], out["latency_at_s"], out["error_at_s"]
        out["errors_total"] = self.errors_total
        out["loadgen_cpu_pct"] = self.loadgen_cpu_pct
        out["loadgen_cpu_us_per_request"] = self.loadgen_cpu_us_per_request
        return out


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    if not latencies_s:
        return {name: 0.0 for name in (*(p for p, _ in PERCENTILES), "max", "mean")}
    ordered = sorted(latencies_s)
    n = len(ordered)
    # Nearest-rank percentiles: the value at or below which q of the samples lie.
    out = {name: ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * 1e3 for name, q in PERCENTILES}
    out["max"] = ordered[-1] * 1e3
    out["mean"] = math.fsum(ordered) / n * 1e3
    return out


def _summarise(
    run: _Run, *, rate_per_s: float | None, connections: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    window_s = max(duration_s, run.last_answer - run.t_measure)
    return {
        "mode": "closed" if rate_per_s is None else "open",
        "connections": connections,
        "rate_per_s": rate_per_s,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "window_s": window_s,
        "requests_sent": run.sent,
        "requests_measured": run.ok + sum(run.errors.values()),
        "requests_ok": run.ok,
        "errors": {str(k): v for k, v in sorted(run.errors.items())},
        "ok_per_s": run.ok / window_s,
        "latency_ms": latency_summary_ms(run.lat),
        "error_samples": run.samples,
        "schedule_lag_max_ms": run.schedule_lag_max_s * 1e3,
        "latencies_s": run.lat,
        "sent_late": run.sent_late,
        "send_lag_max_ms": run.send_lag_max_s * 1e3,
        "latency_at_s": run.lat_at,
        "error_at_s": run.error_at,
    }


def merge_results(results: Sequence[LoadResult]) -> LoadResult:
    """Combine the results of processes that loaded the same server at the same time."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    errors: Counter[str] = Counter()
    latencies, latency_at, error_at = array("d"), array("d"), array("d")
    for r in results:
        errors.update(r.errors)
        latencies.extend(r.latencies_s)
        latency_at.extend(r.latency_at_s)
        error_at.extend(r.error_at_s)
    rates = [r.rate_per_s for r in results if r.rate_per_s is not None]
    window_s = max(r.window_s for r in results)
    ok = sum(r.requests_ok for r in results)
    return LoadResult(
        mode=first.mode,
        connections=sum(r.connections for r in results),
        rate_per_s=sum(rates) if rates else None,
        duration_s=first.duration_s,
        warmup_s=first.warmup_s,
        window_s=window_s,
        requests_sent=sum(r.requests_sent for r in results),
        requests_measured=sum(r.requests_measured for r in results),
        requests_ok=ok,
        errors=dict(sorted(errors.items())),
        ok_per_s=ok / window_s,
        latency_ms=latency_summary_ms(latencies),
        error_samples=[s for r in results for s in r.error_samples][:ERROR_SAMPLES_MAX],
        schedule_lag_max_ms=max(r.schedule_lag_max_ms for r in results),
        loadgen_cpu_s=sum(r.loadgen_cpu_s for r in results),
        wall_s=max(r.wall_s for r in results),
        processes=sum(r.processes for r in results),
        latencies_s=latencies,
        sent_late=sum(r.sent_late for r in results),
        send_lag_max_ms=max(r.send_lag_max_ms for r in results),
        latency_at_s=latency_at,
        error_at_s=error_at,
    )


def intervals(result: LoadResult, interval_s: float) -> list[dict[str, float]]:
    """Per slice of the window (by when requests fell due): answers, ok/s, latency
    percentiles and errors, to see whether a long run stayed flat."""
    count = max(1, math.ceil(result.duration_s / interval_s - 1e-9))
    lat: list[list[float]] = [[] for _ in range(count)]
    for at, latency in zip(result.latency_at_s, result.latencies_s, strict=True):
        lat[min(count - 1, int(at // interval_s))].append(latency)
    errors = [0] * count
    for at in result.error_at_s:
        errors[min(count - 1, int(at // interval_s))] += 1
    rows = []
    for i in range(count):
        summary = latency_summary_ms(lat[i])
        answered = len(lat[i])
        rows.append(
            {
                "start_s": i * interval_s,
                "answered": answered,
                "per_s": answered / min(interval_s, result.duration_s - i * interval_s),
                "p50_ms": summary["p50"],
                "p99_ms": summary["p99"],
                "p999_ms": summary["p999"],
                "errors": errors[i],
            }
        )
    return rows


def format_table(result: LoadResult) -> str:
    lat = result.latency_ms
    if result.mode == "closed":
        mode = f"closed loop, {result.connections} connections"
    else:
        mode = f"open loop, {result.rate_per_s:g}/s over {result.connections} connections"
    errors = ", ".join(f"{k}: {v}" for k, v in result.errors.items()) or "none"
    rows = [
        ("mode", mode),
        ("window s", f"{result.window_s:.2f} after {result.warmup_s:g} s warmup"),
        ("requests ok", f"{result.requests_ok} of {result.requests_measured} measured"),
        ("errors", f"{result.errors_total} ({errors})"),
        ("throughput ok/s", f"{result.ok_per_s:.1f}"),
        ("latency ms", "  ".join(f"{k} {lat[k]:.2f}" for k in ("p50", "p90", "p99", "p999"))),
        ("latency ms max", f"{lat['max']:.2f} (mean {lat['mean']:.2f})"),
        (
            "loadgen cpu s",
            f"{result.loadgen_cpu_s:.2f} = {result.loadgen_cpu_pct:.0f}% of a core over "
            f"{result.wall_s:.1f} s wall, {result.loadgen_cpu_us_per_request:.1f} µs/request, "
            f"{result.processes} process(es)",
        ),
    ]
    if result.mode == "open":
        rows.append(("schedule lag ms", f"max {result.schedule_lag_max_ms:.2f} (generator's own)"))
        rows.append(
            (
                "sent late",
                f"{result.sent_late} of {result.requests_measured} written "
                f">= {LATE_SEND_S * 1e3:g} ms after due (max {result.send_lag_max_ms:.2f} ms)",
            )
        )
    lines = [f"{name:<17}{value}" for name, value in rows]
    lines += [f"  sample {s}" for s in result.error_samples]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points


async def run_load(
    *,
    host: str,
    port: int,
    accounts: Sequence[int],
    duration_s: float,
    warmup_s: float = 0.0,
    connections: int = 64,
    rate_per_s: float | None = None,
    hot_account_id: int | None = None,
    outstanding_max: int = 10_000,
    drain_timeout_s: float = 10.0,
    run_id: str | None = None,
    currency: str = "CNY",
    seed: int | None = None,
    start_at_epoch_s: float | None = None,
    partner: Partner | None = None,
) -> LoadResult:
    """Load POST /v1/transfers; closed loop, or open loop when rate_per_s is given.

    start_at_epoch_s lines up processes that share one run (see run_load_processes).
    """
    if connections < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("need connections >= 1, duration_s > 0, warmup_s >= 0")
    if rate_per_s is not None and rate_per_s <= 0:
        raise ValueError("rate_per_s must be positive")
    requests = TransferRequests(
        host=host,
        port=port,
        accounts=accounts,
        key_prefix=run_id or uuid.uuid4().hex[:12],
        hot_account_id=hot_account_id,
        currency=currency,
        seed=seed,
        partner=partner,
    )
    open_loop = rate_per_s is not None
    run = _Run(
        requests=requests,
        host=host,
        port=port,
        open_loop=open_loop,
        outstanding_max=outstanding_max,
    )
    conns = await asyncio.gather(*(run.connect() for _ in range(connections)))
    if start_at_epoch_s is not None:
        await asyncio.sleep(max(0.0, start_at_epoch_s - time.time()))
    cpu0_s = time.process_time()
    t_start = _perf()
    run.t_measure = t_start + warmup_s
    run.t_end = run.t_measure + duration_s
    if rate_per_s is None:
        for conn in conns:
            run.dispatch(conn, t_start)
    else:
        run.idle.extend(conns)
        run.spawn(run.tick(t_start, rate_per_s))
    await run.finish(drain_timeout_s)
    wall_s = _perf() - t_start
    summary = _summarise(
        run,
        rate_per_s=rate_per_s,
        connections=connections,
        warmup_s=warmup_s,
        duration_s=duration_s,
    )
    return LoadResult(**summary, loadgen_cpu_s=time.process_time() - cpu0_s, wall_s=wall_s)


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, just costs more per request
        return None
    return uvloop.new_event_loop


def run_load_sync(kwargs: dict[str, Any]) -> LoadResult:
    """run_load in a fresh (uvloop) event loop; also the body of each worker process."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_load(**kwargs))


def run_load_processes(*, processes: int = 1, **kwargs: Any) -> LoadResult:
    """Split one run over `processes` processes when one core cannot generate enough load.

    Connections and rate are divided between them; each gets its own Idempotency-Key
    prefix, and all start on one wall-clock instant so their windows coincide.
    """
    if processes <= 1:
        return run_load_sync(kwargs)
    connections = kwargs.get("connections", 64)
    if connections < processes:
        raise ValueError("need at least one connection per process")
    run_id = kwargs.get("run_id") or uuid.uuid4().hex[:12]
    start_at = time.time() + PROCESS_START_DELAY_S
    shares = []
    for i in range(processes):
        share = dict(kwargs, run_id=f"{run_id}p{i}", start_at_epoch_s=start_at)
        share["connections"] = connections // processes + (i < connections % processes)
        if kwargs.get("rate_per_s") is not None:
            share["rate_per_s"] = kwargs["rate_per_s"] / processes
        if kwargs.get("seed") is not None:
            share["seed"] = kwargs["seed"] + i
        shares.append(share)
    # spawn, not fork: the parent may hold an event loop, which must not be inherited.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        return merge_results(list(pool.map(run_load_sync, shares)))


# ----------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="Load txengine's POST /v1/transfers over raw HTTP/1.1 keep-alive.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--accounts", help="account ids, comma separated")
    src.add_argument("--accounts-file", type=Path, help="account ids, one a line or JSON list")
    src.add_argument("--setup-accounts", type=int, metavar="N", help="create N funded users")
    p.add_argument("--initial-minor", type=int, default=1_000_000, help="funding per user")
    p.add_argument("--hot-account", type=int, metavar="ID", help="every transfer credits ID")
    p.add_argument("--hot", action="store_true", help="create a merchant and use it as hot")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rate-per-s", type=float, help="open loop at this rate (default: closed)")
    p.add_argument("--outstanding-max", type=int, default=10_000, help="open-loop backlog cap")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--drain-timeout-s", type=float, default=10.0)
    p.add_argument("--processes", type=int, default=1, help="split the load over K processes")
    p.add_argument("--seed", type=int)
    p.add_argument("--partner-id", help="sign every request as this partner")
    p.add_argument(
        "--partner-secret",
        default=os.environ.get("TXENGINE_PARTNER_SECRET"),
        help="its HMAC secret (default: $TXENGINE_PARTNER_SECRET, which keeps it off ps)",
    )
    p.add_argument("--json-out", type=Path, help="also write the result as JSON")
    return p.parse_args(argv)


def _partner(args: argparse.Namespace) -> Partner | None:
    if args.partner_id is None:
        return None
    if not args.partner_secret:
        raise SystemExit("--partner-id needs --partner-secret or $TXENGINE_PARTNER_SECRET")
    return args.partner_id, args.partner_secret


async def _resolve_accounts(args: argparse.Namespace) -> tuple[list[int], int | None]:
    base_url = f"http://{args.host}:{args.port}"
    partner = _partner(args)
    if args.setup_accounts is not None:
        accounts = await setup_accounts(
            base_url, count=args.setup_accounts, initial_minor=args.initial_minor, partner=partner
        )
    elif args.accounts_file is not None:
        accounts = parse_account_ids(args.accounts_file.read_text())
    else:
        accounts = parse_account_ids(args.accounts)
    hot = args.hot_account
    if args.hot and hot is None:
        hot = await setup_hot_account(base_url, partner=partner)
    return accounts, hot


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        accounts, hot = runner.run(_resolve_accounts(args))
    result = run_load_processes(
        processes=args.processes,
        host=args.host,
        port=args.port,
        accounts=accounts,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        connections=args.connections,
        rate_per_s=args.rate_per_s,
        hot_account_id=hot,
        outstanding_max=args.outstanding_max,
        drain_timeout_s=args.drain_timeout_s,
        seed=args.seed,
        partner=_partner(args),
    )
    print(format_table(result))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0 if result.requests_ok > 0 else 1


if __name__ == "__main__":
    # Re-enter through the package so worker processes unpickle bench.loadgen's classes,
    # not a second copy living in __main__.
    from bench.loadgen import main as _main

    sys.exit(_main())
