"""/v1/trades over HTTP: the escrow flow, its refunds, every illegal step answered with a
problem that changes nothing, idempotent POSTs, and every reply checked against the
OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.reconcile import reconcile
from tests.gateway.support import (
    DOCUMENT,
    UNKNOWN_ID,
    Api,
    Reply,
    World,
    assert_problem,
    make_world,
    serving,
    snapshot,
    validate_request,
    validate_response,
)

PRICE = 2_000


def _trade(world: World, **changes: Any) -> dict[str, Any]:
    body = {
        "out_trade_no": "SHOP_0001",
        "seller_account_id": world.merchant,
        "buyer_account_id": world.user,
        "amount_minor": PRICE,
        "currency": "CNY",
        "subject": "A Yixing teapot",
        "notify_url": "https://shop.example/notify",
    }
    body.update(changes)
    return body


async def _create(api: Api, world: World, **changes: Any) -> dict[str, Any]:
    reply = await api.post("/v1/trades", _trade(world, **changes))
    assert reply.status == 201, reply.body
    trade: dict[str, Any] = reply.json
    return trade


async def _step(api: Api, trade_id: str, action: str, **kwargs: Any) -> Reply:
    return await api.post(f"/v1/trades/{trade_id}/{action}", {}, **kwargs)


async def _state(api: Api, world: World, trade_id: str) -> dict[str, Any]:
    """What a refused step must leave as it was (its idempotency record aside)."""
    state = await snapshot(api, world)
    state.pop("keys")
    state["trade"] = (await api.get(f"/v1/trades/{trade_id}")).json
    state["refunds"] = (await api.get(f"/v1/trades/{trade_id}/refunds")).json
    async with api.engine.pool.acquire() as conn:
        state["events"] = await conn.fetchval("SELECT count(*) FROM outbox_events")
    return state


async def _at(api: Api, world: World, state: str, **changes: Any) -> str:
    trade_id: str = (await _create(api, world, **changes))["id"]
    path = {
        "WAIT_BUYER_PAY": [],
        "WAIT_SELLER_SEND_GOODS": ["pay"],
        "WAIT_BUYER_CONFIRM_GOODS": ["pay", "ship"],
        "TRADE_SUCCESS": ["pay", "ship", "confirm"],
        "TRADE_CLOSED": ["close"],
    }[state]
    for action in path:
        assert (await _step(api, trade_id, action)).status == 200
    return trade_id


async def test_the_escrow_flow_over_http(api: Api, world: World) -> None:
    covered: set[tuple[str, str]] = set()

    async def check(method: str, template: str, path: str, body: Any = None) -> Reply:
        if body is not None:
            validate_request(template, body)
        reply = await api.call(method, path, body)
        validate_response(method, template, reply)
        assert reply.status in (200, 201), reply.body
        covered.add((method, template))
        return reply

    created = (await check("POST", "/v1/trades", "/v1/trades", _trade(world))).json
    trade_id = created["id"]
    assert created["state"] == "WAIT_BUYER_PAY" and created["timeout_express"] == "15d"
    assert created["confirm_timeout_express"] == "10d"
    assert created["refund_window_express"] == "90d"
    one = "/v1/trades/{trade_id}"
    assert (await check("GET", one, f"/v1/trades/{trade_id}")).json == created
    query = f"/v1/trades?out_trade_no=SHOP_0001&seller_account_id={world.merchant}"
    assert (await check("GET", "/v1/trades", query)).json == created

    paid = (await check("POST", one + "/pay", f"/v1/trades/{trade_id}/pay", {})).json
    assert paid["state"] == "WAIT_SELLER_SEND_GOODS" and paid["held_minor"] == PRICE
    assert await api.balance(world.user) == {
        "posted_minor": 10_000,
        "pending_minor": -PRICE,  # credit-normal: an outgoing hold
        "available_minor": 10_000 - PRICE,
    }
    hold = (await api.get(f"/v1/transfers/{paid['hold_transfer_id']}")).json
    assert hold["status"] == "pending" and hold["expires_at"] is None
    shipped = (await check("POST", one + "/ship", f"/v1/trades/{trade_id}/ship", {})).json
    assert shipped["state"] == "WAIT_BUYER_CONFIRM_GOODS"
    done = (await check("POST", one + "/confirm", f"/v1/trades/{trade_id}/confirm", {})).json
    assert done["state"] == "TRADE_SUCCESS" and done["confirmed_by"] == "buyer"
    assert (await api.balance(world.merchant))["posted_minor"] == PRICE  # no fee rate set

    refunds = one + "/refunds"
    body = {"out_request_no": "R_1", "amount_minor": 500, "reason": "chipped lid"}
    refunded = (await check("POST", refunds, f"/v1/trades/{trade_id}/refunds", body)).json
    assert refunded["amount_minor"] == 500 and refunded["after_settlement"] is True
    assert refunded["trade"]["refunded_minor"] == 500
    assert refunded["trade"]["refundable_minor"] == PRICE - 500
    listed = (await check("GET", refunds, f"/v1/trades/{trade_id}/refunds")).json
    assert [r["id"] for r in listed["data"]] == [refunded["id"]]
    assert "trade" not in listed["data"][0]
    assert (await api.balance(world.merchant))["posted_minor"] == PRICE - 500

    closable = await check("POST", "/v1/trades", "/v1/trades", _trade(world, out_trade_no="B"))
    closed = await check("POST", one + "/close", f"/v1/trades/{closable.json['id']}/close", {})
    assert closed.json["state"] == "TRADE_CLOSED" and closed.json["close_reason"] == "seller_closed"

    assert covered == {
        (method.upper(), path)
        for path, ops in DOCUMENT["paths"].items()
        for method in ops
        if path.startswith("/v1/trades")
    }
    async with api.engine.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT type, notify_url, payload FROM outbox_events WHERE subject_id = $1 ORDER BY id",
            int(trade_id),
        )
    assert [r["type"] for r in rows] == [
        "trade.paid",
        "trade.shipped",
        "trade.succeeded",
        "trade.refunded",
    ]
    assert {r["notify_url"] for r in rows} == {"https://shop.example/notify"}


async def test_a_full_refund_before_shipping_closes_the_trade(api: Api, world: World) -> None:
    trade_id = await _at(api, world, "WAIT_SELLER_SEND_GOODS")
    body = {"out_request_no": "all", "amount_minor": PRICE}
    reply = await api.post(f"/v1/trades/{trade_id}/refunds", body)
    assert reply.status == 201, reply.body
    assert reply.json["trade"]["state"] == "TRADE_CLOSED"
    assert reply.json["trade"]["close_reason"] == "fully_refunded"
    assert await api.balance(world.user) == {
        "posted_minor": 10_000,
        "pending_minor": 0,
        "available_minor": 10_000,
    }
    # The same out_request_no again answers the same refund and moves nothing.
    again = await api.post(f"/v1/trades/{trade_id}/refunds", body)
    assert again.status == 201 and again.json["id"] == reply.json["id"]


_ILLEGAL = [
    ("WAIT_BUYER_PAY", "confirm"),
    ("WAIT_BUYER_PAY", "ship"),
    ("WAIT_SELLER_SEND_GOODS", "pay"),
    ("WAIT_SELLER_SEND_GOODS", "confirm"),
    ("WAIT_SELLER_SEND_GOODS", "close"),
    ("WAIT_BUYER_CONFIRM_GOODS", "ship"),
    ("TRADE_SUCCESS", "confirm"),
    ("TRADE_SUCCESS", "close"),
    ("TRADE_CLOSED", "pay"),
    ("TRADE_CLOSED", "close"),
]


@pytest.mark.parametrize(("state", "action"), _ILLEGAL)
async def test_an_illegal_step_is_a_409_that_changes_nothing(
    api: Api, world: World, state: str, action: str
) -> None:
    trade_id = await _at(api, world, state)
    before = await _state(api, world, trade_id)
    reply = await _step(api, trade_id, action, key="illegal")
    body = assert_problem(reply, 409, "trade_state_conflict")
    assert body["state"] == state and body["trade_id"] == trade_id
    validate_response("POST", f"/v1/trades/{{trade_id}}/{action}", reply)
    assert await _state(api, world, trade_id) == before
    retried = await _step(api, trade_id, action, key="illegal")
    assert retried.json == reply.json and retried.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("state", ["WAIT_BUYER_PAY", "TRADE_CLOSED"])
async def test_a_refund_of_an_unpaid_or_closed_trade_is_a_409(
    api: Api, world: World, state: str
) -> None:
    trade_id = await _at(api, world, state)
    before = await _state(api, world, trade_id)
    reply = await api.post(
        f"/v1/trades/{trade_id}/refunds", {"out_request_no": "r", "amount_minor": 1}
    )
    assert assert_problem(reply, 409, "trade_state_conflict")["state"] == state
    assert await _state(api, world, trade_id) == before


async def test_refunding_more_than_was_paid_is_a_409(api: Api, world: World) -> None:
    trade_id = await _at(api, world, "WAIT_BUYER_CONFIRM_GOODS")
    before = await _state(api, world, trade_id)
    reply = await api.post(
        f"/v1/trades/{trade_id}/refunds", {"out_request_no": "r", "amount_minor": PRICE + 1}
    )
    assert assert_problem(reply, 409, "refund_exceeds_paid")["refundable_minor"] == PRICE
    validate_response("POST", "/v1/trades/{trade_id}/refunds", reply)
    assert await _state(api, world, trade_id) == before


async def test_a_refund_the_seller_cannot_cover_is_a_422(api: Api, world: World) -> None:
    trade_id = await _at(api, world, "TRADE_SUCCESS")
    assert (await api.move(world.merchant, world.bank, PRICE)).status == 201  # spent
    before = await _state(api, world, trade_id)
    reply = await api.post(
        f"/v1/trades/{trade_id}/refunds", {"out_request_no": "r", "amount_minor": 1}
    )
    assert_problem(reply, 422, "insufficient_funds")
    assert await _state(api, world, trade_id) == before


async def test_a_trades_hold_cannot_be_voided_or_posted_directly(api: Api, world: World) -> None:
    trade_id = await _at(api, world, "WAIT_SELLER_SEND_GOODS")
    hold_id = (await api.get(f"/v1/trades/{trade_id}")).json["hold_transfer_id"]
    before = await _state(api, world, trade_id)
    for action in ("void", "post"):
        reply = await api.post(f"/v1/transfers/{hold_id}/{action}", {})
        assert_problem(reply, 409, "transfer_held_by_product")
    assert await _state(api, world, trade_id) == before
    reserved = await api.move(world.user, world.merchant, 1, metadata={"txengine.product": "x"})
    assert_problem(reserved, 400, "validation_error")


async def test_pay_without_the_money_is_a_422(api: Api, world: World) -> None:
    trade_id = (await _create(api, world, amount_minor=10_001))["id"]
    before = await _state(api, world, trade_id)
    assert_problem(await _step(api, trade_id, "pay"), 422, "insufficient_funds")
    assert await _state(api, world, trade_id) == before


async def test_posts_are_idempotent(api: Api, world: World) -> None:
    first = await api.post("/v1/trades", _trade(world), key="create-1")
    again = await api.post("/v1/trades", _trade(world), key="create-1")
    assert first.status == again.status == 201 and first.json == again.json
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await api.post("/v1/trades", _trade(world, amount_minor=1), key="create-1")
    assert_problem(other, 422, "idempotency_key_reused")
    taken = await api.post("/v1/trades", _trade(world))
    assert assert_problem(taken, 409, "out_trade_no_taken")["trade_id"] == first.json["id"]
    trade_id = first.json["id"]
    paid = await _step(api, trade_id, "pay", key="pay-1")
    replayed = await _step(api, trade_id, "pay", key="pay-1")
    assert paid.status == replayed.status == 200 and paid.json == replayed.json
    assert (await api.balance(world.user))["available_minor"] == 10_000 - PRICE
    assert_problem(await _step(api, trade_id, "ship", key=None), 400, "idempotency_key_missing")
    body = {"out_request_no": "R1", "amount_minor": 300}
    refunded = await api.post(f"/v1/trades/{trade_id}/refunds", body, key="refund-1")
    again = await api.post(f"/v1/trades/{trade_id}/refunds", body, key="refund-1")
    assert refunded.status == again.status == 201 and refunded.json == again.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await api.balance(world.user))["available_minor"] == 10_000 - PRICE + 300


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"out_trade_no": "no spaces"}, "$.out_trade_no"),
        ({"timeout_express": "1c"}, "$.timeout_express"),
        ({"timeout_express": "16d"}, "$.timeout_express"),
        ({"confirm_timeout_express": "2h"}, "$.confirm_timeout_express"),
        ({"amount_minor": 0}, "$.amount_minor"),
        ({"currency": "XYZ"}, "$.currency"),
        ({"notify_url": "mailto:x"}, "$.notify_url"),
        ({"subject": ""}, "$.subject"),
        ({"unknown": 1}, "$"),
    ],
)
async def test_a_malformed_trade_is_a_validation_problem(
    api: Api, world: World, changes: dict[str, Any], path: str
) -> None:
    before = await api.counts()
    reply = await api.post("/v1/trades", _trade(world, **changes))
    body = assert_problem(reply, 400, "validation_error")
    assert body["errors"][0]["path"] == path, body
    after = await api.counts()
    assert after == before  # refused before any key is claimed


async def test_the_buyer_and_seller_must_be_the_callers_accounts(api: Api, world: World) -> None:
    for changes, status, code in [
        ({"buyer_account_id": UNKNOWN_ID}, 404, "account_not_found"),
        ({"buyer_account_id": world.dollars}, 422, "currency_mismatch"),
        ({"buyer_account_id": world.merchant}, 400, "validation_error"),
    ]:
        assert_problem(await api.post("/v1/trades", _trade(world, **changes)), status, code)


async def test_unknown_trades_are_404(api: Api, world: World) -> None:
    for reply in (
        await api.get(f"/v1/trades/{UNKNOWN_ID}"),
        await api.get("/v1/trades/nope"),
        await api.get(f"/v1/trades/{UNKNOWN_ID}/refunds"),
        await _step(api, UNKNOWN_ID, "pay"),
        await api.get(f"/v1/trades?out_trade_no=NONE&seller_account_id={world.merchant}"),
    ):
        assert_problem(reply, 404, "trade_not_found")
    for query in (
        "out_trade_no=A",
        f"seller_account_id={world.merchant}",
        f"out_trade_no=a%20b&seller_account_id={world.merchant}",
        "out_trade_no=A&seller_account_id=x",
    ):
        assert_problem(await api.get(f"/v1/trades?{query}"), 400, "validation_error")


async def test_a_restart_in_the_middle_of_the_flow(dsn: str) -> None:
    async with serving(dsn) as first:
        world = await make_world(first)
        trade_id = await _at(first, world, "WAIT_SELLER_SEND_GOODS")
        paid_with = await _step(first, trade_id, "pay", key="pay-before-restart")
        assert_problem(paid_with, 409, "trade_state_conflict")
    async with serving(dsn) as second:
        # The stored answer survives the restart, and the flow goes on.
        again = await _step(second, trade_id, "pay", key="pay-before-restart")
        assert again.json == paid_with.json and again.headers["Idempotent-Replayed"] == "true"
        assert (await _step(second, trade_id, "ship")).status == 200
        done = await _step(second, trade_id, "confirm")
        assert done.status == 200 and done.json["state"] == "TRADE_SUCCESS"
        assert (await second.balance(world.merchant))["posted_minor"] == PRICE
        async with second.engine.pool.acquire() as conn:
            broken = [o for o in await reconcile(conn) if o.violations]
        assert broken == []


async def test_confirm_and_refunds_racing_over_http_leave_one_outcome(
    api: Api, world: World
) -> None:
    trade_id = await _at(api, world, "WAIT_BUYER_CONFIRM_GOODS")
    refund = {"out_request_no": "race", "amount_minor": PRICE}
    replies = await asyncio.gather(
        _step(api, trade_id, "confirm"),
        api.post(f"/v1/trades/{trade_id}/refunds", refund),
        api.post(f"/v1/trades/{trade_id}/refunds", refund),
        _step(api, trade_id, "confirm"),
    )
    confirms = [r for r in (replies[0], replies[3]) if r.status == 200]
    assert len(confirms) <= 1
    # The full refund went through (the second answers the same refund by its number).
    assert replies[1].status == replies[2].status == 201
    assert replies[1].json["id"] == replies[2].json["id"]
    trade = (await api.get(f"/v1/trades/{trade_id}")).json
    assert trade["state"] == "TRADE_CLOSED" and trade["refunded_minor"] == PRICE
    assert trade["settled_minor"] == (PRICE if confirms else 0)
    assert (await api.balance(world.user))["available_minor"] == 10_000
    assert (await api.balance(world.merchant))["posted_minor"] == 0
    async with api.engine.pool.acquire() as conn:
        broken = [o for o in await reconcile(conn) if o.violations]
    assert broken == []
