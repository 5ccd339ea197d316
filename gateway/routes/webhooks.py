"""/v1/webhook_deliveries: a partner's webhook deliveries, and asking for a redelivery."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from engine import InvalidCursor
from engine.products import webhooks
from engine.products.webhooks import DELIVERIES_PAGE_LIMIT_MAX, DeliveryStatus, DeliveryView
from gateway.commands import ENGINE, caller_scope, run
from gateway.problems import ProblemError
from gateway.routes._request import page_cursor, page_limit, path_id, read_body
from gateway.schemas import encode, invalid
from gateway.webhook_schemas import WebhookRedeliver, delivery_json, delivery_page_json

DELIVERIES_PAGE_LIMIT_DEFAULT: Final = 20
routes = web.RouteTableDef()


def _status(request: web.Request) -> DeliveryStatus | None:
    text = request.query.get("status")
    if text is None:
        return None
    try:
        return DeliveryStatus(text)
    except ValueError:
        choices = ", ".join(s.value for s in DeliveryStatus)
        raise invalid("status", f"status must be one of {choices}") from None


@routes.get("/v1/webhook_deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    status = _status(request)
    limit = page_limit(
        request, default=DELIVERIES_PAGE_LIMIT_DEFAULT, maximum=DELIVERIES_PAGE_LIMIT_MAX
    )
    cursor = page_cursor(request)
    try:
        page = await webhooks.list_deliveries(
            request.app[ENGINE],
            scope=caller_scope(request),
            status=status,
            limit=limit,
            starting_after=cursor,
        )
    except InvalidCursor as error:
        raise ProblemError("invalid_cursor", detail=str(error)) from None
    return web.Response(body=encode(delivery_page_json(page)), content_type="application/json")


@routes.post("/v1/webhook_deliveries/{delivery_id}/redeliver")
async def redeliver(request: web.Request) -> web.Response:
    """Send the event again now; a delivered or dead delivery starts the schedule afresh."""
    delivery_id = path_id(request, "delivery_id", not_found=webhooks.NOT_FOUND)
    body = await read_body(request, WebhookRedeliver)
    return await run(
        request,
        webhooks.redeliver(delivery_id),
        answer_type=DeliveryView,
        operation="redeliver_webhook",
        body=body,
        render=delivery_json,
        status=200,
    )


ROUTES: Final = list(routes)
