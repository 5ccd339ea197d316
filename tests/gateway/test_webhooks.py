"""/v1/webhook_deliveries over HTTP (listing, redelivery), a delivery end to end from a
product step to a real receiver, the operator's secret command, and the metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import prometheus_client

from engine.products import dispatcher, signatures
from gateway import metrics
from tests.engine.products.webhook_support import queue_delivery, receiving
from tests.gateway.support import UNKNOWN_ID, Api, assert_problem, validate_response

LIST = "/v1/webhook_deliveries"
REDELIVER = "/v1/webhook_deliveries/{delivery_id}/redeliver"


async def _list(api: Api, query: str = "") -> dict[str, Any]:
    reply = await api.get(LIST + query)
    assert reply.status == 200, reply.body
    validate_response("GET", LIST, reply)
    body: dict[str, Any] = reply.json
    return body


async def test_deliveries_are_listed_by_page_and_status_and_only_the_callers(api: Api) -> None:
    ids = [
        await queue_delivery(api.engine, "http://127.0.0.1:1/", scope=api.signer.partner_id)
        for _ in range(3)
    ]
    await queue_delivery(api.engine, "http://127.0.0.1:1/", scope="partner-2")
    first = await _list(api, "?limit=2")
    assert [d["id"] for d in first["data"]] == [str(ids[2]), str(ids[1])]
    assert first["has_more"] is True
    rest = await _list(api, f"?limit=2&starting_after={ids[1]}")
    assert [d["id"] for d in rest["data"]] == [str(ids[0])] and rest["has_more"] is False
    delivery = rest["data"][0]
    assert delivery["status"] == "pending" and delivery["attempts"] == 0
    assert delivery["event_type"] == "order.paid" and delivery["subject_id"] == "7"
    assert (await _list(api, "?status=dead"))["data"] == []
    assert len((await _list(api, "?status=pending"))["data"]) == 3

    for query in ("?status=lost", "?limit=0", "?limit=101", "?limit=x"):
        reply = await api.get(LIST + query)
        assert_problem(reply, 400, "validation_error")
        validate_response("GET", LIST, reply)
    for cursor in ("abc", UNKNOWN_ID):
        assert_problem(await api.get(f"{LIST}?starting_after={cursor}"), 400, "invalid_cursor")


async def test_a_redelivery_is_idempotent_and_refuses_what_is_not_the_callers(api: Api) -> None:
    mine = await queue_delivery(api.engine, "http://127.0.0.1:1/", scope=api.signer.partner_id)
    theirs = await queue_delivery(api.engine, "http://127.0.0.1:1/", scope="partner-2")
    before = await _list(api)
    path = REDELIVER.format(delivery_id=mine)
    reply = await api.post(path, {}, key="again-1")
    assert reply.status == 200, reply.body
    validate_response("POST", REDELIVER, reply)
    assert reply.json["id"] == str(mine) and reply.json["status"] == "pending"
    replay = await api.post(path, {}, key="again-1")
    assert replay.status == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json == reply.json
    assert_problem(await api.post(path, {}, key=None), 400, "idempotency_key_missing")

    after_mine = await _list(api)
    for delivery_id in (theirs, UNKNOWN_ID, "0"):
        reply = await api.post(REDELIVER.format(delivery_id=delivery_id), {})
        assert_problem(reply, 404, "webhook_delivery_not_found")
        validate_response("POST", REDELIVER, reply)
    assert await _list(api) == after_mine, "a refused redelivery changes nothing"
    assert [d["id"] for d in before["data"]] == [str(mine)]


def _delivered_count() -> float:
    found = prometheus_client.REGISTRY.get_sample_value(
        "txengine_webhook_attempts_total", {"outcome": "delivered"}
    )
    return found or 0.0


def _txengine(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TXENGINE_DATABASE_URL": dsn, "TXENGINE_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "webhooks", "secret", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_step_s_event_reaches_a_real_receiver_signed_with_the_operators_secret(
    dsn: str, api: Api
) -> None:
    partner = api.signer.partner_id  # secrets and deliveries are the partner's
    created = _txengine(dsn, "create", "--scope", partner)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("whsec_") and secret not in created.stderr
    again = _txengine(dsn, "create", "--scope", partner)
    assert again.returncode == 1 and "rotate" in again.stderr

    async with receiving(lambda: api.engine.clock().timestamp()) as receiver:
        receiver.secrets = [secret]
        delivery_id = await queue_delivery(api.engine, receiver.url(), scope=partner)
        before = _delivered_count()
        config = dispatcher.DispatcherConfig(timeout_s=2.0)
        async with dispatcher.open_session(config) as session:
            sent = await dispatcher.run_once(
                api.engine, session, config=config, observer=metrics.WebhookMetrics()
            )
        assert sent == 1
        (got,) = receiver.received
    assert got.verified and signatures.HEADER in got.headers
    listed = (await _list(api))["data"][0]
    assert listed["id"] == str(delivery_id) and listed["status"] == "delivered"
    assert listed["event_id"] == got.event_id == got.json["id"]
    assert _delivered_count() == before + 1
    exposition = (await api.get("/metrics")).body.decode()
    assert 'txengine_webhook_attempts_total{outcome="delivered"}' in exposition

    rotated = _txengine(dsn, "rotate", "--scope", partner, "--overlap-s", "60")
    assert rotated.returncode == 0 and rotated.stdout.strip() not in (secret, "")
    missing = _txengine(dsn, "rotate", "--scope", "nobody")
    assert missing.returncode == 1 and "create one" in missing.stderr
