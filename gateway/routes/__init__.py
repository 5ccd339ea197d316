"""One module per resource; `ROUTES` lists every route the application serves."""

from aiohttp import web

from gateway.routes import accounts, system, trades, transfers

ROUTES: list[web.AbstractRouteDef] = [
    *accounts.ROUTES,
    *transfers.ROUTES,
    *trades.ROUTES,
    *system.ROUTES,
]
