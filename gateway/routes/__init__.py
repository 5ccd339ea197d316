"""One module per resource; `ROUTES` lists every route the application serves."""

from aiohttp import web

from gateway.routes import (
    accounts,
    channels,
    statements,
    system,
    topups,
    trades,
    transfers,
    webhooks,
    withdrawals,
)

ROUTES: list[web.AbstractRouteDef] = [
    *accounts.ROUTES,
    *statements.ROUTES,
    *transfers.ROUTES,
    *trades.ROUTES,
    *topups.ROUTES,
    *withdrawals.ROUTES,
    *channels.ROUTES,
    *webhooks.ROUTES,
    *system.ROUTES,
]
