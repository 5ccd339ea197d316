"""A stand-in for txengine's gateway, with no database, for checking the bench tools.

It answers the routes the benchmark uses with the status codes the real server gives, so
the load generator, account set-up and bench.run can be exercised before (or without) the
engine. It takes the same command line as `python -m gateway.cli serve`.

`--raw` swaps aiohttp for a canned-answer asyncio.Protocol, the cheapest server Python can
offer; loading it shows the load generator's own ceiling and CPU cost per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing
import signal
from collections.abc import Sequence
from typing import cast

import orjson
from aiohttp import web

ID_WORKER_SHIFT = 40  # worker index in the high bits keeps ids unique across workers
TRANSFER_FIELDS = ("debit_account_id", "credit_account_id", "amount_minor", "currency")
RAW_ANSWER = (
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n"
    b'{"id":"1","status":"posted"}\n'
)


def make_app(worker: int = 0) -> web.Application:
    ids = itertools.count((worker << ID_WORKER_SHIFT) + 1)

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def create_account(request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        account = {"id": str(next(ids)), "currency": doc["currency"], "kind": doc["kind"]}
        return web.Response(status=201, body=orjson.dumps(account), content_type="application/json")

    async def create_transfer(request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        missing = [f for f in TRANSFER_FIELDS if f not in doc]
        if missing or not request.headers.get("Idempotency-Key"):
            body = {"error": "validation", "missing": missing}
            return web.Response(
                status=422, body=orjson.dumps(body), content_type="application/json"
            )
        transfer = {"id": str(next(ids)), "status": "posted", **doc}
        return web.Response(
            status=201, body=orjson.dumps(transfer), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/readyz", ready)
    app.router.add_get("/healthz", ready)
    app.router.add_post("/v1/accounts", create_account)
    app.router.add_post("/v1/transfers", create_transfer)
    return app


class _RawProtocol(asyncio.Protocol):
    """Answers every complete request with RAW_ANSWER; knows only Content-Length."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                break
            i = buf.find(b"Content-Length:", 0, head_end)
            length = int(buf[i + 15 : buf.find(b"\r", i)]) if i >= 0 else 0
            end = head_end + 4 + length
            if len(buf) < end:
                break
            buf = buf[end:]
            self.transport.write(RAW_ANSWER)
        self.buf = buf


async def _serve_raw(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_RawProtocol, host, port, reuse_port=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _worker(host: str, port: int, raw: bool, index: int) -> None:
    import uvloop

    if raw:
        uvloop.run(_serve_raw(host, port))
    else:
        web.run_app(
            make_app(index),
            host=host,
            port=port,
            reuse_port=True,
            print=None,
            access_log=None,
            loop=uvloop.new_event_loop(),
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fakeserver")
    p.add_argument("command", choices=["serve"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--raw", action="store_true", help="canned answers, no aiohttp")
    args = p.parse_args(argv)
    if args.workers <= 1:
        _worker(args.host, args.port, args.raw, 0)
        return 0
    procs = [
        multiprocessing.Process(target=_worker, args=(args.host, args.port, args.raw, i))
        for i in range(args.workers)
    ]
    for proc in procs:
        proc.start()

    def forward_sigterm(*_: object) -> None:
        # The parent only forwards SIGTERM, so that stopping it stops the workers.
        for proc in procs:
            proc.terminate()

    signal.signal(signal.SIGTERM, forward_sigterm)
    for proc in procs:
        with contextlib.suppress(KeyboardInterrupt):
            proc.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
