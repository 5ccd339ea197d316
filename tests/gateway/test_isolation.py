"""Tenant isolation: a partner sees and moves only what it created.

The route test is generic: it walks every path of /openapi.json that has a path
parameter, every method of it, and asks as partner B for what partner A owns. B must get
exactly what an id that does not exist gets (404, never 403 or the thing itself), and A's
things must not change. A route added later is covered as soon as it is in the document;
if it brings a new kind of path parameter, `test_every_path_parameter_has_an_owner` fails
until `_owned_by` learns to make one, and a new POST route fails until `_BODIES` gives
it a valid body (so ownership decides the answer, not validation).

Ids also travel in bodies and queries (a trade's buyer, an order's merchant, a QR code, a
payment code, a biller): the second walk sends another partner's there, each checked to
answer what an unknown one answers, even when the request would otherwise leak a fact
(the account's currency, its payer's funds), and to move nothing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Final

from tests.engine.products.webhook_support import queue_delivery
from tests.gateway.support import (
    DOCUMENT,
    UNKNOWN_ID,
    Api,
    Reply,
    World,
    add_partner,
    assert_problem,
    make_world,
    validate_request,
)

_PARAMETER: Final = re.compile(r"\{(\w+)\}")


# Called by banks with their own signature, never by a partner (gateway/auth.py exempts
# it from partner signing): a partner's ids have no meaning there, so it is not walked.
_NOT_PARTNER_ROUTES: Final = frozenset({"/v1/channels/{channel}/callbacks"})
# Parameters that are not ids: a nonexistent one is the same value under an unknown owner.
_NOT_IDS: Final = frozenset({"date", "out_trade_no"})
_REFUND: Final = {"out_request_no": "R_ISOLATION", "amount_minor": 100}
# A valid body per POST template, so the answer is decided by ownership, not validation.
_BODIES: Final[dict[str, dict[str, Any]]] = {
    "/v1/transfers/{transfer_id}/post": {},
    "/v1/transfers/{transfer_id}/void": {},
    "/v1/step-ups/{step_up_id}/confirm": {"code": "123456"},
    "/v1/webhook_deliveries/{delivery_id}/redeliver": {},
    "/v1/trades/{trade_id}/pay": {},
    "/v1/trades/{trade_id}/ship": {},
    "/v1/trades/{trade_id}/confirm": {},
    "/v1/trades/{trade_id}/close": {},
    "/v1/trades/{trade_id}/refunds": _REFUND,
    "/v1/orders/{order_id}/close": {},
    "/v1/orders/{order_id}/refunds": _REFUND,
}
# A's rows that nothing B does may change (B's own idempotency records, nonces, audit
# lines and risk refusals aside).
_OWNED_TABLES: Final = (
    "accounts", "transfers", "entries", "outbox_events", "webhook_deliveries",
    "channel_requests", "trades", "trade_refunds", "orders", "order_refunds",
    "payment_codes", "billers", "bill_payments", "step_up_challenges", "step_up_outbox",
)  # fmt: skip


def _templates() -> list[tuple[str, str]]:
    """(method, path template) of every partner operation with a path parameter under /v1."""
    return [
        (method.upper(), template)
        for template, operations in DOCUMENT["paths"].items()
        if template.startswith("/v1/") and _PARAMETER.search(template)
        if template not in _NOT_PARTNER_ROUTES
        for method in operations
    ]


@dataclasses.dataclass
class Owned:
    world: World
    ids: dict[str, str]  # an id of each path parameter's kind, owned by the partner
    order: dict[str, Any]


async def _created(api: Api, path: str, body: dict[str, Any], status: int = 201) -> Any:
    reply = await api.post(path, body)
    assert reply.status == status, (path, reply.status, reply.body)
    return reply.json


async def _owned_by(api: Api) -> Owned:
    """One instance of every kind a path names, owned by `api`'s partner."""
    world = await make_world(api)
    hold = await api.move(world.user, world.merchant, 100, pending=True)
    assert hold.status == 201, hold
    trade = await _created(api, "/v1/trades", {
        "out_trade_no": "ISO_T1", "seller_account_id": world.merchant,
        "buyer_account_id": world.user, "amount_minor": 2_000, "currency": "CNY",
        "subject": "a teapot",
    })  # fmt: skip
    paid = await api.post(f"/v1/trades/{trade['id']}/pay", {})
    assert paid.status == 200, paid.body  # paid: ship, close, refund are all A's to try
    order = await _created(api, "/v1/orders", {
        "merchant_account_id": world.merchant, "out_trade_no": "ISO_O1", "subject": "tea",
        "amount_minor": 1_000, "currency": "CNY",
    })  # fmt: skip
    # No bank answers in this test: the request is still taken and stays pending.
    money = {"account_id": world.user, "amount_minor": 300, "currency": "CNY"}
    topup = await _created(api, "/v1/topups", {**money, "channel": "ebank"})
    withdrawal = await _created(
        api, "/v1/withdrawals", {**money, "channel": "card", "destination": "6222020200112233"}
    )
    assert (topup["state"], withdrawal["state"]) == ("pending", "pending")
    await api.set_account_rules(world.user, step_up_threshold_minor=1_000)
    step_up = await _created(api, "/v1/transfers", world.transfer(amount_minor=1_500), 202)
    await api.set_account_rules(world.user, step_up_threshold_minor=None)
    delivery = await queue_delivery(api.engine, "http://127.0.0.1:1/", scope=api.signer.partner_id)
    biller_account = await api.open_account("merchant")
    biller = await _created(api, "/v1/billers", {
        "account_id": biller_account, "name": "Water works", "biller_type": "utility",
    })  # fmt: skip
    ids = {
        "account_id": world.user,
        "transfer_id": hold.json["id"],
        "trade_id": trade["id"],
        "order_id": order["id"],
        "topup_id": topup["id"],
        "withdrawal_id": withdrawal["id"],
        "step_up_id": step_up["id"],
        "delivery_id": str(delivery),
        "biller_id": biller["id"],
        "date": api.engine.clock().date().isoformat(),
        "out_trade_no": order["out_trade_no"],
    }
    return Owned(world, ids, order)


def _problem(reply: Reply) -> tuple[int, dict[str, Any]]:
    """A problem answer with its ids blanked: what tells one refusal from another."""
    assert reply.content_type == "application/problem+json", reply.body
    fields = {
        name: re.sub(r"[0-9]+", "N", value) if isinstance(value, str) else value
        for name, value in reply.json.items()
    }
    return reply.status, fields


def _fill(template: str, ids: dict[str, str]) -> str:
    return _PARAMETER.sub(lambda m: ids[m.group(1)], template)


async def _rows(api: Api) -> dict[str, list[str]]:
    """Every row of every product and ledger table, as text."""
    async with api.engine.pool.acquire() as conn:
        return {
            table: [r[0] for r in await conn.fetch(f"SELECT t::text FROM {table} t ORDER BY 1")]
            for table in _OWNED_TABLES
        }


def test_every_path_parameter_has_an_owner() -> None:
    known = {
        "account_id", "transfer_id", "trade_id", "order_id", "topup_id", "withdrawal_id",
        "step_up_id", "delivery_id", "biller_id", "date", "out_trade_no",
    }  # fmt: skip
    for method, template in _templates():
        for name in _PARAMETER.findall(template):
            assert name in known, f"{template}: teach _owned_by to make a {name}"
        if method == "POST":
            assert template in _BODIES, f"{template}: give it a valid body in _BODIES"


async def test_another_partners_ids_are_not_found_on_every_route(api: Api) -> None:
    owned = await _owned_by(api)
    other = api.as_partner(await add_partner(api.engine, "other-shop"))
    unknown = {name: value if name in _NOT_IDS else UNKNOWN_ID for name, value in owned.ids.items()}
    before = await _rows(api)
    tried = 0
    for method, template in _templates():
        body = _BODIES.get(template) if method == "POST" else None
        if body is not None:
            validate_request(template, body)
        # A merchant's orders are found under the merchant's account.
        merchant = template.startswith("/v1/merchants/")
        mine = dict(owned.ids, account_id=owned.world.merchant) if merchant else owned.ids
        if method == "GET":  # the id is real: its owner reads it
            assert (await api.get(_fill(template, mine))).status == 200, template
        foreign = await other.call(method, _fill(template, mine), body)
        missing = await other.call(method, _fill(template, unknown), body)
        assert foreign.status == 404, (method, template, foreign.body)
        assert _problem(foreign) == _problem(missing), (method, template)
        assert foreign.json["code"].endswith("not_found"), (method, template, foreign.body)
        tried += 1
    assert tried >= 20
    # The other partner's 404s wrote nothing of A's.
    after = await _rows(api)
    for table in _OWNED_TABLES:
        assert after[table] == before[table], table
    # B's own merchant with A's out_trade_no finds nothing either.
    own = await other.open_account("merchant")
    reply = await other.get(f"/v1/merchants/{own}/orders/{owned.ids['out_trade_no']}")
    assert_problem(reply, 404, "order_not_found")


_NO_CODE: Final = "999999999999999999"


async def _same_as_unknown(api: Api, path: str, body: dict[str, Any], **foreign: str) -> str:
    """POST `body` with `foreign` ids and again with unknown ones: one 4xx answer, the
    not-found kind; its code."""
    unknown = {name: _NO_CODE if name == "code" else UNKNOWN_ID for name in foreign}
    validate_request(path, {**body, **foreign})
    theirs = await api.post(path, {**body, **foreign})
    missing = await api.post(path, {**body, **unknown})
    assert theirs.status in (404, 422), (path, foreign, theirs.body)
    assert _problem(theirs) == _problem(missing), (path, foreign)
    assert theirs.json["code"] in _NOT_FOUND_CODES, (path, foreign, theirs.body)
    return str(theirs.json["code"])


# What an id that is not the caller's answers; a payment code is a secret, not an id, so
# an unknown one is "invalid" rather than "not found".
_NOT_FOUND_CODES: Final = frozenset(
    {"account_not_found", "order_not_found", "biller_not_found", "payment_code_invalid"}
)


async def test_another_partners_ids_in_bodies_and_queries_are_not_found(api: Api) -> None:
    owned = await _owned_by(api)
    a, order = owned.world, owned.order
    code = await _created(api, "/v1/payment_codes", {"payer_account_id": a.user})
    other = api.as_partner(await add_partner(api.engine, "body-thief"))
    b = await make_world(other)
    b_order = await _created(other, "/v1/orders", {
        "merchant_account_id": b.merchant, "out_trade_no": "B_O1", "subject": "tea",
        "amount_minor": 100, "currency": "CNY",
    })  # fmt: skip
    b_code = await _created(other, "/v1/payment_codes", {"payer_account_id": b.user})
    b_biller = await _created(other, "/v1/billers", {
        "account_id": await other.open_account("merchant"), "name": "Gas", "biller_type": "utility",
    })  # fmt: skip
    a_biller = owned.ids["biller_id"]
    before = await _rows(api)
    b_before = (await other.balance(b.user), await other.balance(b.merchant))

    trade = {"out_trade_no": "B_T1", "amount_minor": 100, "currency": "CNY", "subject": "x"}
    new_order = {"out_trade_no": "B_O2", "subject": "x", "amount_minor": 100, "currency": "CNY"}
    charge = {"out_trade_no": "B_C1", "subject": "x", "amount_minor": 100, "currency": "CNY"}
    bill = {"reference": "1234567890", "amount_minor": 100, "currency": "CNY"}
    money = {"amount_minor": 300, "currency": "CNY"}
    withdrawal = {**money, "channel": "card", "destination": "6222020200112233"}
    usd = {"currency": "USD", "amount_minor": 100}
    # (path, B's own part of a valid body, the ids that are A's)
    cases: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/v1/trades", {**trade, "buyer_account_id": b.user}, {"seller_account_id": a.merchant}),
        ("/v1/trades", {**trade, "seller_account_id": b.merchant}, {"buyer_account_id": a.user}),
        ("/v1/orders", new_order, {"merchant_account_id": a.merchant}),
        ("/v1/orders/pay", {"qr_code": b_order["qr_code"]}, {"payer_account_id": a.user}),
        ("/v1/payment_codes", {}, {"payer_account_id": a.user}),
        (
            "/v1/payment_codes/charge",
            {**charge, "merchant_account_id": b.merchant},
            {"code": code["code"]},
        ),
        (
            "/v1/payment_codes/charge",
            {**charge, "code": b_code["code"]},
            {"merchant_account_id": a.merchant},
        ),
        ("/v1/bills/pay", {**bill, "payer_account_id": b.user}, {"biller_id": a_biller}),
        ("/v1/bills/pay", {**bill, "biller_id": b_biller["id"]}, {"payer_account_id": a.user}),
        ("/v1/topups", {**money, "channel": "ebank"}, {"account_id": a.user}),
        ("/v1/withdrawals", withdrawal, {"account_id": a.user}),
        # A's accounts are CNY: a USD request must not learn that from a currency_mismatch,
        (
            "/v1/trades",
            {**trade, **usd, "buyer_account_id": b.dollars},
            {"seller_account_id": a.merchant},
        ),
        ("/v1/orders", {**new_order, **usd}, {"merchant_account_id": a.merchant}),
        ("/v1/topups", {**money, **usd, "channel": "ebank"}, {"account_id": a.user}),
        # nor what A's payer holds from an insufficient_funds.
        (
            "/v1/payment_codes/charge",
            {**charge, "merchant_account_id": b.merchant, "amount_minor": 10**9},
            {"code": code["code"]},
        ),
    ]
    for path, body, foreign in cases:
        await _same_as_unknown(other, path, body, **foreign)
    # A's order's QR code, paid by B, is an order B does not have.
    for qr_code in (order["qr_code"], "txengine://pay/" + "x" * 22):
        paid = await other.post("/v1/orders/pay", {"qr_code": qr_code, "payer_account_id": b.user})
        assert_problem(paid, 404, "order_not_found")

    query = f"out_trade_no=ISO_T1&seller_account_id={a.merchant}"
    assert (await api.get(f"/v1/trades?{query}")).status == 200
    assert_problem(await other.get(f"/v1/trades?{query}"), 404, "trade_not_found")
    query = f"out_trade_no=ISO_T1&seller_account_id={b.merchant}"
    assert_problem(await other.get(f"/v1/trades?{query}"), 404, "trade_not_found")
    assert len((await api.get("/v1/webhook_deliveries")).json["data"]) >= 1
    assert (await other.get("/v1/webhook_deliveries")).json["data"] == []
    # B's queries moved nothing of A's, and B's refusals moved nothing of B's.
    after = await _rows(api)
    for table in _OWNED_TABLES:
        assert [r for r in after[table] if "body-thief" not in r] == [
            r for r in before[table] if "body-thief" not in r
        ], table
    assert (await other.balance(b.user), await other.balance(b.merchant)) == b_before


async def test_another_partners_accounts_cannot_be_moved(api: Api) -> None:
    world = await make_world(api)
    other = api.as_partner(await add_partner(api.engine, "thief"))
    own = await other.open_account("system")
    before = await api.balance(world.user)
    cases = [
        {"debit_account_id": world.user, "credit_account_id": own},
        {"debit_account_id": own, "credit_account_id": world.user},
    ]
    for accounts in cases:
        body = {**accounts, "amount_minor": 100, "currency": "CNY"}
        assert_problem(await other.post("/v1/transfers", body), 404, "account_not_found")
        group = {"transfers": [body]}
        reply = await other.post("/v1/transfer_groups", group)
        assert reply.status == 404 and reply.json["code"] == "account_not_found", reply
    assert await api.balance(world.user) == before


async def test_idempotency_keys_are_per_partner(api: Api) -> None:
    """The same key from two partners is two requests: neither sees the other's answer."""
    other = api.as_partner(await add_partner(api.engine, "same-key-shop"))
    mine = await api.post("/v1/accounts", {"currency": "CNY", "kind": "user"}, key="k-1")
    theirs = await other.post("/v1/accounts", {"currency": "USD", "kind": "user"}, key="k-1")
    assert mine.status == theirs.status == 201
    assert mine.json["id"] != theirs.json["id"]
    assert "Idempotent-Replayed" not in theirs.headers
    assert_problem(await other.get(f"/v1/accounts/{mine.json['id']}"), 404, "account_not_found")
