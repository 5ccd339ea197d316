"""One module per resource; `ROUTES` lists every route the application serves."""

from aiohttp import web

from gateway.routes import (
    accounts,
    bills,
    channels,
    orders,
    payment_codes,
    statements,
    step_ups,
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
    *step_ups.ROUTES,
    *trades.ROUTES,
    *orders.ROUTES,
    *payment_codes.ROUTES,
    *bills.ROUTES,
    *topups.ROUTES,
    *withdrawals.ROUTES,
    *channels.ROUTES,
    *webhooks.ROUTES,
    *system.ROUTES,
]
