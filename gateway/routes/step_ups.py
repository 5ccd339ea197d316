"""/v1/step-ups: the payer confirms a transfer above its step-up threshold with the
one-time code sent to it; the transfer then runs, once, through the normal engine path."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from engine import ConfirmStepUp, Result
from gateway.commands import caller_scope, submit
from gateway.routes._request import path_id, read_body
from gateway.schemas import StepUpConfirm, group_json, transfer_json

routes = web.RouteTableDef()


def _render(result: Result) -> dict[str, Any]:
    # A linked group (group_id set) answers as POST /v1/transfer_groups would have.
    if len(result.transfers) == 1 and result.transfers[0].group_id is None:
        return transfer_json(result.transfers[0])
    return group_json(result.transfers)


@routes.post("/v1/step-ups/{step_up_id}/confirm")
async def confirm_step_up(request: web.Request) -> web.Response:
    step_up_id = path_id(request, "step_up_id", not_found="step_up_not_found")
    body = await read_body(request, StepUpConfirm)
    command = ConfirmStepUp(challenge_id=step_up_id, code=body.code, scope=caller_scope(request))
    # The code is part of the idempotency fingerprint, so a retry with the same key and
    # another code is refused as a reused key. That fingerprint is an unsalted hash of a
    # guessable code, but only of a code already tried: right, it is spent; wrong, useless.
    return await submit(
        request, command, operation="confirm_step_up", body=body, render=_render, status=201
    )


ROUTES: Final = list(routes)
