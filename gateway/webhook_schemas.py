"""Request and response types of the webhook routes, and their JSON (kept apart from
gateway/schemas.py, which every product adds to)."""

from __future__ import annotations

from typing import Any

import msgspec

from engine.products.webhooks import DeliveryPage, DeliveryView


class WebhookRedeliver(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def delivery_json(delivery: DeliveryView) -> dict[str, Any]:
    return {
        "object": "webhook_delivery",
        "id": str(delivery.id),
        "event_id": str(delivery.event_id),
        "event_type": delivery.event_type,
        "subject_id": str(delivery.subject_id),
        "url": delivery.url,
        "status": delivery.status.value,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at,
        "last_attempt_at": delivery.last_attempt_at,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": delivery.created_at,
        "delivered_at": delivery.delivered_at,
    }


def delivery_page_json(page: DeliveryPage) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [delivery_json(d) for d in page.deliveries],
        "has_more": page.has_more,
    }
