"""One module per resource; `ROUTES` lists every route the application serves."""

from aiohttp import web

from gateway.routes import accounts, channels, system, topups, transfers, withdrawals

ROUTES: list[web.AbstractRouteDef] = [
    *accounts.ROUTES,
    *transfers.ROUTES,
    *topups.ROUTES,
    *withdrawals.ROUTES,
    *channels.ROUTES,
    *system.ROUTES,
]
