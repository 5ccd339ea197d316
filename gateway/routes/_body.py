"""Reading a request body: media type, then typed decoding."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web

from gateway.problems import ProblemError
from gateway.schemas import decode_body

T = TypeVar("T", bound=msgspec.Struct)


async def read_body(request: web.Request, type_: type[T]) -> T:
    """The request's JSON body as `type_`. aiohttp refuses bodies over the app's limit."""
    body = await request.read()
    if body and request.content_type != "application/json":
        raise ProblemError(
            "unsupported_media_type", detail=f"got {request.content_type!r}, want application/json"
        )
    return decode_body(body, type_)
