"""One module per resource; `ROUTES` lists every route the application serves."""

from aiohttp import web

from gateway.routes import accounts, bills, orders, payment_codes, system, transfers

ROUTES: list[web.AbstractRouteDef] = [
    *accounts.ROUTES,
    *transfers.ROUTES,
    *orders.ROUTES,
    *payment_codes.ROUTES,
    *bills.ROUTES,
    *system.ROUTES,
]
