"""What webhook tests share: a partner's endpoint (a real local HTTP server that checks
every delivery's signature with the secrets it was told, and answers as a test wants),
and a tiny product step that queues a delivery."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestServer

from engine import Engine
from engine.products import Step, run_step, signatures
from engine.products.dispatcher import EVENT_ID_HEADER


@dataclasses.dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool  # the signature matched one of the receiver's secrets, in time

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return self.headers[EVENT_ID_HEADER]


@dataclasses.dataclass
class Receiver:
    server: TestServer
    secrets: list[str]
    now: Callable[[], float]  # the time receivers check the signature's age against
    received: list[Received] = dataclasses.field(default_factory=list)
    answer_status: int = 200
    answer_body: bytes = b"success"
    hang_s: float = 0.0
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def url(self, path: str = "/notify") -> str:
        return str(self.server.make_url(path))

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get(signatures.HEADER, "")
        verified = signatures.verify(header, body, self.secrets, now=self.now())
        self.received.append(Received(dict(request.headers), body, verified))
        self.arrived.set()
        # The answer is decided when the request arrives, however long it then hangs.
        status, answer = self.answer_status, self.answer_body
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        return web.Response(status=status, body=answer)


@contextlib.asynccontextmanager
async def receiving(now: Callable[[], float]) -> AsyncIterator[Receiver]:
    app = web.Application()
    server = TestServer(app)
    receiver = Receiver(server=server, secrets=[], now=now)
    app.router.add_post("/notify", receiver.handle)
    await server.start_server()
    try:
        yield receiver
    finally:
        await server.close()


class Queued(msgspec.Struct, frozen=True):
    delivery_id: int


async def queue_delivery(engine: Engine, url: str, *, scope: str = "public") -> int:
    """An event with a notify_url from a tiny product step; its delivery's id."""

    async def step(s: Step) -> Queued:
        event_id = await s.notify(
            event_type="order.paid", subject_id=7, payload={"total_minor": 1}, notify_url=url
        )
        found = await s.conn.fetchval(
            "SELECT id FROM webhook_deliveries WHERE event_id = $1", event_id
        )
        return Queued(found)

    outcome = await run_step(engine, step, answer_type=Queued, scope=scope, idempotency=None)
    assert outcome.value is not None
    return outcome.value.delivery_id
