"""Reading a request: its body (media type, then typed decoding) and its path ids."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web

from gateway.problems import ProblemError
from gateway.schemas import decode_body, invalid, parse_id

T = TypeVar("T", bound=msgspec.Struct)


async def read_body(request: web.Request, type_: type[T]) -> T:
    """The request's JSON body as `type_`. aiohttp refuses bodies over the app's limit."""
    body = await request.read()
    if body and request.content_type != "application/json":
        raise ProblemError(
            "unsupported_media_type", detail=f"got {request.content_type!r}, want application/json"
        )
    return decode_body(body, type_)


def path_id(request: web.Request, name: str, *, not_found: str) -> int:
    """The id in path segment `name`; one that cannot exist is simply not found."""
    value = parse_id(request.match_info[name])
    if value is None:
        raise ProblemError(not_found, detail=f"no such {name.removesuffix('_id')}")
    return value


def body_id(text: str, path: str) -> int:
    """The id in body field `path`; one that cannot exist is a validation error."""
    value = parse_id(text)
    if value is None:
        raise invalid(path, f"{text!r} is not a valid id")
    return value
