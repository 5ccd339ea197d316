"""One module per resource; `ROUTES` lists every route the application serves."""

from aiohttp import web

from gateway.routes import accounts, statements, system, transfers, webhooks

ROUTES: list[web.AbstractRouteDef] = [
    *accounts.ROUTES,
    *statements.ROUTES,
    *transfers.ROUTES,
    *webhooks.ROUTES,
    *system.ROUTES,
]
