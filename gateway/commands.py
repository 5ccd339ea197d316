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
    ResultCode,
    Unavailable,
)
from gateway.idempotency import REPLAYED_HEADER, idempotency_of
from gateway.problems import ProblemError, problem
from gateway.schemas import encode, step_up_json

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
    """The caller whose accounts a request may see. Until partner authentication exists,
    every caller shares the public scope."""
    scope: str = request.get(SCOPE, "public")
    return scope


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
    if result.code is ResultCode.STEP_UP_REQUIRED:
        # Accepted, not done: nothing moves until the payer confirms with the code.
        assert result.step_up is not None
        return web.Response(
            status=202, body=encode(step_up_json(result.step_up)), content_type="application/json"
        )
    if not result.ok:
        extensions: dict[str, Any] = {}
        for name in ("failed_index", "retry_after_s", "attempts_left"):
            value = getattr(result, name)
            if value is not None:
                extensions[name] = value
        return problem(result.code.value, detail=result.detail, **extensions)
    return web.Response(status=status, body=encode(render(result)), content_type="application/json")
