"""/v1/transfers and /v1/transfer_groups: move money, hold it, post or void holds."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from engine import CreateTransfers, PostPending, Result, VoidPending
from gateway.commands import ENGINE, caller_scope, submit
from gateway.problems import ProblemError
from gateway.routes._request import path_id, read_body
from gateway.schemas import (
    TransferCreate,
    TransferGroupCreate,
    TransferPost,
    TransferVoid,
    encode,
    group_json,
    transfer_json,
    transfer_spec,
)

routes = web.RouteTableDef()


def _render_one(result: Result) -> dict[str, Any]:
    (transfer,) = result.transfers
    return transfer_json(transfer)


def _render_group(result: Result) -> dict[str, Any]:
    return group_json(result.transfers)


@routes.post("/v1/transfers")
async def create_transfer(request: web.Request) -> web.Response:
    body = await read_body(request, TransferCreate)
    command = CreateTransfers(transfers=(transfer_spec(body),), scope=caller_scope(request))
    return await submit(
        request, command, operation="create_transfer", body=body, render=_render_one, status=201
    )


@routes.post("/v1/transfer_groups")
async def create_transfer_group(request: web.Request) -> web.Response:
    body = await read_body(request, TransferGroupCreate)
    specs = tuple(transfer_spec(t, path=f"$.transfers[{i}]") for i, t in enumerate(body.transfers))
    command = CreateTransfers(transfers=specs, linked=True, scope=caller_scope(request))
    return await submit(
        request, command, operation="create_group", body=body, render=_render_group, status=201
    )


def _transfer_id(request: web.Request) -> int:
    return path_id(request, "transfer_id", not_found="transfer_not_found")


@routes.post("/v1/transfers/{transfer_id}/post")
async def post_transfer(request: web.Request) -> web.Response:
    transfer_id = _transfer_id(request)
    body = await read_body(request, TransferPost)
    command = PostPending(
        transfer_id=transfer_id, amount_minor=body.amount_minor, scope=caller_scope(request)
    )
    return await submit(
        request, command, operation="post_transfer", body=body, render=_render_one, status=200
    )


@routes.post("/v1/transfers/{transfer_id}/void")
async def void_transfer(request: web.Request) -> web.Response:
    transfer_id = _transfer_id(request)
    body = await read_body(request, TransferVoid)
    command = VoidPending(transfer_id=transfer_id, scope=caller_scope(request))
    return await submit(
        request, command, operation="void_transfer", body=body, render=_render_one, status=200
    )


@routes.get("/v1/transfers/{transfer_id}")
async def get_transfer(request: web.Request) -> web.Response:
    transfer_id = _transfer_id(request)
    transfer = await request.app[ENGINE].transfer(transfer_id, scope=caller_scope(request))
    if transfer is None:
        raise ProblemError("transfer_not_found", detail=f"no transfer {transfer_id}")
    return web.Response(body=encode(transfer_json(transfer)), content_type="application/json")


ROUTES: Final = list(routes)
