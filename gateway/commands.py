"""Submitting a request's command to the engine and turning the outcome into HTTP.

Every state-changing route goes through `submit` (a ledger command) or `run` (a product
step): the one place where the engine's results, outcomes and exceptions become statuses
and problem documents.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

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
from engine.products import Outcome, Step, run_step
from gateway.idempotency import REPLAYED_HEADER, idempotency_of
from gateway.problems import ProblemError, problem
from gateway.schemas import encode, step_up_json

T = TypeVar("T")

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


async def run(
    request: web.Request,
    step: Callable[[Step], Awaitable[T]],
    *,
    answer_type: type[T],
    operation: str,
    body: Any,
    render: Callable[[T], dict[str, Any]],
    status: int,
    after_commit: Callable[[T], Awaitable[None]] | None = None,
) -> web.Response:
    """Run a product step once under the request's idempotency key and answer it.

    `after_commit` runs with the step's value (a first answer or a replayed one) once the
    transaction committed and before the answer is sent: the place for work that must
    not hold a transaction open, such as asking a bank."""
    scope = caller_scope(request)
    idempotency = idempotency_of(request, scope=scope, operation=operation, body=body)
    try:
        outcome = await run_step(
            request.app[ENGINE], step, answer_type=answer_type, scope=scope, idempotency=idempotency
        )
    except EngineError as error:
        raise problem_error(request, error) from None
    if after_commit is not None and outcome.value is not None:
        await after_commit(outcome.value)
    response = outcome_response(outcome, render=render, status=status)
    if outcome.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


async def run_unkeyed(
    request: web.Request, step: Callable[[Step], Awaitable[T]], *, answer_type: type[T], scope: str
) -> Outcome[T]:
    """Run a product step that has no Idempotency-Key because its own rows guard it (a
    bank's callback: the request's state says whether it was applied)."""
    try:
        return await run_step(
            request.app[ENGINE], step, answer_type=answer_type, scope=scope, idempotency=None
        )
    except EngineError as error:
        raise problem_error(request, error) from None


async def read(
    request: web.Request,
    step: Callable[[Step], Awaitable[T]],
    *,
    answer_type: type[T],
    render: Callable[[T], dict[str, Any]],
) -> web.Response:
    """Run a read-only product step (no idempotency key: it changes nothing) and answer it."""
    try:
        outcome = await run_step(
            request.app[ENGINE],
            step,
            answer_type=answer_type,
            scope=caller_scope(request),
            idempotency=None,
        )
    except EngineError as error:
        raise problem_error(request, error) from None
    return outcome_response(outcome, render=render, status=200)


def outcome_response(
    outcome: Outcome[T], *, render: Callable[[T], dict[str, Any]], status: int
) -> web.Response:
    if outcome.refusal is not None:
        refusal = outcome.refusal
        return problem(refusal.code, detail=refusal.detail, **refusal.extensions)
    assert outcome.value is not None
    body = encode(render(outcome.value))
    return web.Response(status=status, body=body, content_type="application/json")


def problem_error(request: web.Request, error: EngineError) -> ProblemError:
    code = problem_code_of(error)
    if code == "internal_error":
        _log.error("engine error: %r", error, extra={"request_id": request.get(REQUEST_ID)})
        raise error
    return ProblemError(code, detail=str(error))


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
        raise problem_error(request, error) from None
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
