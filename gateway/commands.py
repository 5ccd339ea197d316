"""Submitting a request's command to the engine and turning the outcome into HTTP.

Every state-changing route goes through `submit`: the one place where the engine's
results and exceptions become statuses and problem documents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from engine import (
    Command,
    Conflict,
    Engine,
    EngineError,
    IdempotencyKeyInFlight,
    OutcomeUnknown,
    Overloaded,
    Result,
    Unavailable,
)
from gateway.idempotency import REPLAYED_HEADER, idempotency_of
from gateway.problems import ProblemError, problem
from gateway.schemas import encode

ENGINE: Final = web.AppKey("engine", Engine)
REQUEST_ID: Final = web.RequestKey("request_id", str)
SCOPE: Final = web.RequestKey("scope", str)
_log = logging.getLogger("txengine.gateway")

_RETRYABLE: Final[tuple[tuple[type[EngineError], str], ...]] = (
    (IdempotencyKeyInFlight, "idempotency_key_in_flight"),
    (Overloaded, "overloaded"),
    (OutcomeUnknown, "outcome_unknown"),
    (Unavailable, "unavailable"),
    (Conflict, "conflict"),
)


def caller_scope(request: web.Request) -> str:
    """The partner whose accounts, transfers and idempotency keys a request may see:
    the one that signed it (gateway/auth.py sets it on every /v1 request). Another
    partner's ids are simply not found."""
    return request[SCOPE]


def problem_code_of(error: EngineError) -> str:
    for error_type, code in _RETRYABLE:
        if isinstance(error, error_type):
            return code
    return "internal_error"


async def submit(
    request: web.Request,
    command: Command,
    *,
    operation: str,
    body: Any,
    render: Callable[[Result], dict[str, Any]],
    status: int,
) -> web.Response:
    """Apply `command` once under the request's idempotency key and answer it."""
    idempotency = idempotency_of(
        request, scope=caller_scope(request), operation=operation, body=body
    )
    try:
        result = await request.app[ENGINE].submit(command, idempotency=idempotency)
    except EngineError as error:
        code = problem_code_of(error)
        if code == "internal_error":
            _log.error("engine error: %r", error, extra={"request_id": request.get(REQUEST_ID)})
            raise
        raise ProblemError(code, detail=str(error)) from None
    response = result_response(result, render=render, status=status)
    if result.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


def result_response(
    result: Result, *, render: Callable[[Result], dict[str, Any]], status: int
) -> web.Response:
    if not result.ok:
        extensions: dict[str, Any] = {}
        if result.failed_index is not None:
            extensions["failed_index"] = result.failed_index
        return problem(result.code.value, detail=result.detail, **extensions)
    return web.Response(status=status, body=encode(render(result)), content_type="application/json")
