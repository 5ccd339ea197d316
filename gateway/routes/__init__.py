"""One module per resource; `ROUTES` lists every route the application serves."""

from aiohttp import web

from gateway.routes import accounts, step_ups, system, transfers

ROUTES: list[web.AbstractRouteDef] = [
    *accounts.ROUTES,
    *transfers.ROUTES,
    *step_ups.ROUTES,
    *system.ROUTES,
]
