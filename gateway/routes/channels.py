"""/v1/channels/{channel}/callbacks: a bank tells txengine how a request ended; and the
create and read handlers that /v1/topups and /v1/withdrawals share.

A callback carries no Idempotency-Key: banks retry callbacks, and the request's own state
makes them idempotent (the first authentic callback resolves the hold; a repeat is
answered 200 as a duplicate and does nothing). Only a callback whose signature checks
reaches the database; a forged or stale one is a 401 problem and changes nothing.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from engine.model import is_known_currency, metadata_error
from engine.products.banks import (
    SIGNATURE_HEADER,
    Banks,
    CallbackMalformed,
    CallbackRejected,
    Channel,
    Direction,
)
from engine.products.channels import (
    CallbackAnswer,
    CallbackOutcome,
    ChannelRequestView,
    dispatch,
    open_request,
    read_request,
    request_scope,
    settle,
    view_json,
)
from gateway.channel_schemas import TopupCreate, WithdrawalCreate
from gateway.commands import ENGINE, caller_scope, outcome_response, run, run_unkeyed
from gateway.problems import ProblemError
from gateway.routes._request import path_id, read_body
from gateway.schemas import encode, invalid, parse_id

BANKS: Final = web.AppKey("banks", Banks)
_REFUSED_OUTCOMES: Final = {
    CallbackOutcome.LATE: "channel_request_timed_out",
    CallbackOutcome.CONFLICT: "channel_callback_conflict",
    CallbackOutcome.MISMATCH: "callback_mismatch",
}
routes = web.RouteTableDef()


def request_json(banks: Banks, view: ChannelRequestView) -> dict[str, Any]:
    """A top-up or withdrawal, with what the payer needs to finish it."""
    channel = banks.channel(view.channel)
    instructions = None if channel is None else channel.instructions(view.order())
    return {**view_json(view), "instructions": instructions}


def _channel(request: web.Request, name: str, *, kind: Direction) -> Channel:
    channel = request.app[BANKS].channel(name)
    if channel is None:
        raise invalid("$.channel", f"channel {name!r} is not configured")
    if kind not in channel.directions:
        raise ProblemError(
            "channel_direction_unsupported",
            detail=f"{channel.title} does not serve {kind.value}s",
            channel=name,
        )
    return channel


async def create(request: web.Request, *, kind: Direction) -> web.Response:
    """Open a top-up or withdrawal, then (committed) hand it to its bank."""
    body: TopupCreate | WithdrawalCreate = await read_body(
        request, TopupCreate if kind is Direction.TOPUP else WithdrawalCreate
    )
    account_id = parse_id(body.account_id)
    if account_id is None:
        raise invalid("$.account_id", f"{body.account_id!r} is not a valid id")
    if not is_known_currency(body.currency):
        raise invalid("$.currency", f"unknown currency {body.currency!r}")
    error = metadata_error(body.metadata)
    if error is not None:
        raise invalid("$.metadata", error)
    channel = _channel(request, body.channel, kind=kind)
    step = open_request(
        kind=kind,
        channel=channel,
        account_id=account_id,
        amount_minor=body.amount_minor,
        currency=body.currency,
        destination=body.destination if isinstance(body, WithdrawalCreate) else None,
        notify_url=body.notify_url,
        metadata=body.metadata,
    )
    banks, engine = request.app[BANKS], request.app[ENGINE]

    async def ask_bank(view: ChannelRequestView) -> None:
        await dispatch(engine, banks, view.id)

    return await run(
        request,
        step,
        answer_type=ChannelRequestView,
        operation=f"create_{kind.value}",
        body=body,
        render=lambda view: request_json(banks, view),
        status=201,
        after_commit=ask_bank,
    )


async def read(request: web.Request, *, kind: Direction) -> web.Response:
    not_found = f"{kind.value}_not_found"
    request_id = path_id(request, f"{kind.value}_id", not_found=not_found)
    view = await read_request(
        request.app[ENGINE], request_id, scope=caller_scope(request), kind=kind
    )
    if view is None:
        raise ProblemError(not_found, detail=f"no {kind.value} {request_id}")
    body = encode(request_json(request.app[BANKS], view))
    return web.Response(body=body, content_type="application/json")


@routes.post("/v1/channels/{channel}/callbacks")
async def callback(request: web.Request) -> web.Response:
    name = request.match_info["channel"]
    banks, engine = request.app[BANKS], request.app[ENGINE]
    channel = banks.channel(name)
    if channel is None:
        raise ProblemError("channel_not_found", detail=f"no channel {name!r}")
    raw = await request.read()
    try:
        message = channel.verify_callback(
            request.headers.get(SIGNATURE_HEADER), raw, now=engine.clock()
        )
    except CallbackRejected as error:
        raise ProblemError("callback_signature_invalid", detail=str(error)) from None
    except CallbackMalformed as error:
        raise invalid("$", str(error)) from None
    request_id = parse_id(message.request_id)  # None: beyond int64, never one of ours
    scope = None if request_id is None else await request_scope(engine, request_id, channel=name)
    if request_id is None or scope is None:
        raise ProblemError("channel_request_not_found", detail=f"no {name} request {request_id}")
    outcome = await run_unkeyed(
        request, settle(channel=name, callback=message), answer_type=CallbackAnswer, scope=scope
    )
    answer = outcome.value
    if answer is not None and answer.outcome in _REFUSED_OUTCOMES:
        raise ProblemError(
            _REFUSED_OUTCOMES[answer.outcome],
            detail=f"{answer.request.kind.value} {request_id} is {answer.request.state.value}",
            state=answer.request.state.value,
        )
    return outcome_response(
        outcome,
        render=lambda a: {
            "object": "channel_callback",
            "outcome": a.outcome.value,
            "request": request_json(banks, a.request),
        },
        status=200,
    )


ROUTES: Final = list(routes)
