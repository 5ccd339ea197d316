"""A partner's webhook endpoint for tests: a real local HTTP server that checks every
delivery's signature with the secrets it was told, and answers as a test wants."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from engine.products import signatures
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
