"""Assembles the aiohttp application: routes, the edge middleware, background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from aiohttp import web

from engine import Engine, EngineError
from engine.partners import SecretBox
from engine.products.banks import Banks
from gateway import metrics
from gateway.auth import Authenticator, auth_middleware
from gateway.commands import ENGINE, REQUEST_ID, problem_code_of
from gateway.problems import ProblemError, problem
from gateway.routes import ROUTES
from gateway.routes.channels import BANKS
from gateway.settings import Settings

REQUEST_ID_HEADER: Final = "X-Request-Id"
_REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LANE_DEPTH_INTERVAL_S: Final = 1.0
_HTTP_PROBLEMS: Final = {
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
}

_log = logging.getLogger("txengine.gateway")
_access = logging.getLogger("txengine.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# A request id is this process's random prefix and a counter: unique across processes and
# restarts for all practical purposes, and far cheaper than a uuid4 (a getrandom call)
# per request.
_REQUEST_ID_PREFIX: Final = secrets.token_hex(8)
_request_numbers: Final = itertools.count(1)


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _REQUEST_ID_RE.match(given):
        return given
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):016x}"


def _route_name(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


async def _respond(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's response, or the problem document for whatever it raised."""
    try:
        return await handler(request)
    except ProblemError as error:
        return problem(
            error.code,
            detail=error.detail,
            instance=request.path,
            headers=error.headers,
            **error.extensions,
        )
    except EngineError as error:
        # A read that met a database outage: retryable problems, like the write routes'.
        retry_code = problem_code_of(error)
        if retry_code == "internal_error":
            _log.error("engine error: %r", error, extra={"request_id": request[REQUEST_ID]})
            return problem(retry_code, instance=request.path)
        return problem(retry_code, detail=str(error), instance=request.path)
    except web.HTTPException as error:
        code = _HTTP_PROBLEMS.get(error.status)
        if code is None:
            raise
        response = problem(code, detail=error.reason, instance=request.path)
        if "Allow" in error.headers:  # RFC 9110: a 405 must list the allowed methods
            response.headers["Allow"] = error.headers["Allow"]
        return response
    except Exception:
        _log.exception("unhandled error", extra={"request_id": request[REQUEST_ID]})
        return problem("internal_error", instance=request.path)


def edge_middleware(*, access_log: bool) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request[REQUEST_ID] = _request_id(request)
        response = await _respond(request, handler)
        response.headers[REQUEST_ID_HEADER] = request_id
        elapsed_s = time.perf_counter() - started
        route = _route_name(request)
        metrics.observe_request(route, request.method, response.status, elapsed_s)
        if access_log or response.status >= 500:
            _access.log(
                logging.INFO if response.status < 500 else logging.WARNING,
                "request",
                extra={
                    "request_id": request_id,
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "duration_ms": round(elapsed_s * 1000, 3),
                },
            )
        return response

    return edge


async def _report_lane_depth(engine: Engine) -> None:
    while True:
        metrics.set_lane_depth(sum(engine.lane_depths()))
        await asyncio.sleep(_LANE_DEPTH_INTERVAL_S)


def runner_options(settings: Settings) -> dict[str, float]:
    """Options of the aiohttp server (web.AppRunner, or TestServer in tests)."""
    return {"keepalive_timeout": settings.header_timeout_s}


def make_app(engine: Engine, settings: Settings) -> web.Application:
    authenticator = Authenticator(
        engine, SecretBox(settings.master_key()), body_timeout_s=settings.body_timeout_s
    )
    app = web.Application(
        middlewares=[
            edge_middleware(access_log=settings.access_log),
            auth_middleware(authenticator),
        ],
        client_max_size=settings.body_size_max_bytes,
    )
    app[ENGINE] = engine
    app.add_routes(ROUTES)

    async def nonce_book(app: web.Application) -> AsyncIterator[None]:
        authenticator.nonces.start()
        yield
        await authenticator.nonces.stop()

    app.cleanup_ctx.append(nonce_book)

    async def lane_depth_reporter(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_report_lane_depth(engine))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(lane_depth_reporter)
    banks = app[BANKS] = Banks(settings.channels, config=settings.banks)

    async def bank_client(app: web.Application) -> AsyncIterator[None]:
        await banks.start()
        yield
        await banks.close()

    app.cleanup_ctx.append(bank_client)
    return app
