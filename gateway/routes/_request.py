"""Reading a request: its body (media type, then typed decoding), its path ids, and the
page parameters of a list (`limit`, `starting_after`)."""

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


def page_limit(request: web.Request, *, default: int, maximum: int) -> int:
    text = request.query.get("limit", str(default))
    # isascii(): str.isdigit() also accepts digits such as "²" that int() refuses.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= maximum:
        raise invalid("limit", f"limit must be an integer from 1 to {maximum}")
    return int(text)


def page_cursor(request: web.Request) -> int | None:
    text = request.query.get("starting_after")
    if text is None:
        return None
    cursor = parse_id(text)
    if cursor is None:
        raise ProblemError("invalid_cursor", detail=f"{text!r} is not a cursor of this list")
    return cursor


def body_id(text: str, path: str) -> int:
    """The id in body field `path`; one that cannot exist is a validation error."""
    value = parse_id(text)
    if value is None:
        raise invalid(path, f"{text!r} is not a valid id")
    return value
