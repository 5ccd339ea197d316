"""/v1/topups: money into a wallet through a bank channel (a pending credit until the
bank confirms it)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from engine.products.banks import Direction
from gateway.routes.channels import create, read

routes = web.RouteTableDef()


@routes.post("/v1/topups")
async def create_topup(request: web.Request) -> web.Response:
    return await create(request, kind=Direction.TOPUP)


@routes.get("/v1/topups/{topup_id}")
async def get_topup(request: web.Request) -> web.Response:
    return await read(request, kind=Direction.TOPUP)


ROUTES: Final = list(routes)
