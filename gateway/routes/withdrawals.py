"""/v1/withdrawals: money out of a wallet to a bank (held until the bank has paid)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from engine.products.banks import Direction
from gateway.routes.channels import create, read

routes = web.RouteTableDef()


@routes.post("/v1/withdrawals")
async def create_withdrawal(request: web.Request) -> web.Response:
    return await create(request, kind=Direction.WITHDRAWAL)


@routes.get("/v1/withdrawals/{withdrawal_id}")
async def get_withdrawal(request: web.Request) -> web.Response:
    return await read(request, kind=Direction.WITHDRAWAL)


ROUTES: Final = list(routes)
