"""The HTTP API end to end: aiohttp's test server around `make_app`, on a real engine and a
fresh database per test.

Covers every route's happy path, the Idempotency-Key contract, bad input (each refused
with its stable problem `code` and nothing written), operational routes, and the OpenAPI
document against both the router and real responses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final

import jsonschema
import pytest

from engine import Unavailable
from gateway.problems import PROBLEM_TYPES
from tests.engine.products.webhook_support import queue_delivery
from tests.gateway.support import (
    BODY_SIZE_MAX,
    DEFAULT_PARTNER,
    DOCUMENT,
    UNKNOWN_ID,
    Api,
    Reply,
    World,
    assert_problem,
    snapshot,
    validate_request,
    validate_response,
)

# Products' routes are exercised by their own test modules (test_channels.py ...).
PRODUCT_PATHS: Final = (
    "/v1/topups",
    "/v1/withdrawals",
    "/v1/channels/",
    "/v1/trades",
    "/v1/orders",
    "/v1/merchants/",
    "/v1/payment_codes",
    "/v1/billers",
    "/v1/bills/",
)


async def test_accounts_open_and_read(api: Api) -> None:
    created = await api.post(
        "/v1/accounts", {"currency": "CNY", "kind": "user", "metadata": {"owner": "u-1"}}
    )
    assert created.status == 201 and created.content_type == "application/json"
    account = created.json
    assert account["object"] == "account" and account["id"].isdigit()
    assert account["kind"] == "user" and account["overdraft_allowed"] is False
    assert account["balance"] == {"posted_minor": 0, "pending_minor": 0, "available_minor": 0}
    assert account["metadata"] == {"owner": "u-1"}

    read = await api.get(f"/v1/accounts/{account['id']}")
    assert read.status == 200 and read.json == account
    system = await api.post("/v1/accounts", {"currency": "USD", "kind": "system"})
    assert system.status == 201 and system.json["overdraft_allowed"] is True


async def test_transfers_move_money_and_read_back(api: Api, world: World) -> None:
    reply = await api.post("/v1/transfers", world.transfer(amount_minor=2_500))
    assert reply.status == 201
    made = reply.json
    assert made["object"] == "transfer" and made["status"] == "posted"
    assert made["amount_minor"] == made["posted_amount_minor"] == 2_500
    assert made["debit_account_id"] == world.user and made["credit_account_id"] == world.merchant
    assert made["pending"] is False and made["expires_at"] is None and made["group_id"] is None

    assert (await api.balance(world.user))["posted_minor"] == 7_500
    assert (await api.balance(world.merchant))["available_minor"] == 2_500
    assert (await api.balance(world.bank))["posted_minor"] == -10_000
    read = await api.get(f"/v1/transfers/{made['id']}")
    assert read.status == 200 and read.json == made


async def test_holds_post_in_full_in_part_and_void(api: Api, world: World) -> None:
    held = await api.post("/v1/transfers", world.transfer(amount_minor=1_000, pending=True))
    assert held.status == 201
    hold = held.json
    assert hold["status"] == "pending" and hold["pending"] is True
    assert hold["posted_amount_minor"] == 0 and hold["expires_at"] is None
    assert await api.balance(world.user) == {
        "posted_minor": 10_000,
        "pending_minor": -1_000,
        "available_minor": 9_000,
    }
    full = await api.post(f"/v1/transfers/{hold['id']}/post")
    assert full.status == 200
    assert full.json["status"] == "posted" and full.json["posted_amount_minor"] == 1_000
    assert full.json["resolved_at"] is not None

    timed = await api.post(
        "/v1/transfers", world.transfer(amount_minor=500, pending=True, timeout_s=600)
    )
    assert timed.status == 201
    created_at = datetime.fromisoformat(timed.json["created_at"])
    expires_at = datetime.fromisoformat(timed.json["expires_at"])
    assert expires_at - created_at == timedelta(seconds=600)
    part = await api.post(f"/v1/transfers/{timed.json['id']}/post", {"amount_minor": 200})
    assert part.status == 200
    assert part.json["posted_amount_minor"] == 200 and part.json["amount_minor"] == 500

    voidable = await api.post("/v1/transfers", world.transfer(amount_minor=300, pending=True))
    voided = await api.post(f"/v1/transfers/{voidable.json['id']}/void", {})
    assert voided.status == 200 and voided.json["status"] == "voided"
    assert voided.json["posted_amount_minor"] == 0

    assert await api.balance(world.user) == {
        "posted_minor": 10_000 - 1_200,
        "pending_minor": 0,
        "available_minor": 8_800,
    }
    assert (await api.balance(world.merchant))["posted_minor"] == 1_200
    read = await api.get(f"/v1/transfers/{timed.json['id']}")
    assert read.json["status"] == "posted" and read.json["posted_amount_minor"] == 200


async def test_transfer_groups_all_or_nothing(api: Api, world: World) -> None:
    other = await api.open_account()
    group = {
        "transfers": [
            world.transfer(credit_account_id=other, amount_minor=600),
            world.transfer(debit_account_id=other, amount_minor=600),
        ]
    }
    reply = await api.post("/v1/transfer_groups", group)
    assert reply.status == 201
    made = reply.json
    assert made["object"] == "transfer_group" and made["id"] is not None
    assert [t["group_id"] for t in made["transfers"]] == [made["id"], made["id"]]
    assert (await api.balance(world.merchant))["posted_minor"] == 600

    world_now = await snapshot(api, world)
    failing = {
        "transfers": [
            world.transfer(amount_minor=5_000),
            world.transfer(amount_minor=5_000, pending=True),  # only 4_400 left
        ]
    }
    refused = await api.post("/v1/transfer_groups", failing)
    body = assert_problem(refused, 422, "insufficient_funds")
    assert body["failed_index"] == 1
    after = await snapshot(api, world)
    assert after.pop("keys") == world_now.pop("keys") + 1  # the refusal is kept for retries
    assert after == world_now


async def test_entries_paginate_newest_first(api: Api, world: World) -> None:
    for amount in range(1, 8):
        assert (await api.move(world.user, world.merchant, amount)).status == 201
    # merchant: 7 entries, newest first
    seen: list[dict[str, Any]] = []
    url = f"/v1/accounts/{world.merchant}/entries?limit=3"
    pages = 0
    while True:
        reply = await api.get(url)
        assert reply.status == 200
        page = reply.json
        assert page["object"] == "list"
        seen.extend(page["data"])
        pages += 1
        if not page["has_more"]:
            break
        url = f"/v1/accounts/{world.merchant}/entries?limit=3&starting_after={seen[-1]['id']}"
    assert pages == 3
    assert [e["posted_delta_minor"] for e in seen] == [7, 6, 5, 4, 3, 2, 1]
    assert [e["posted_after_minor"] for e in seen] == [28, 21, 15, 10, 6, 3, 1]
    assert all(e["object"] == "entry" and e["kind"] == "transfer" for e in seen)
    ids = [int(e["id"]) for e in seen]
    assert ids == sorted(ids, reverse=True)

    default = await api.get(f"/v1/accounts/{world.merchant}/entries")
    assert default.json["data"] == seen and default.json["has_more"] is False
    exact = await api.get(f"/v1/accounts/{world.merchant}/entries?limit=7")
    assert len(exact.json["data"]) == 7 and exact.json["has_more"] is False
    most = await api.get(f"/v1/accounts/{world.merchant}/entries?limit=100")
    assert most.status == 200 and len(most.json["data"]) == 7


# -- Idempotency-Key -----------------------------------------------------------------------


async def test_retry_with_same_key_replays_status_and_body(api: Api, world: World) -> None:
    body = world.transfer(amount_minor=250)
    first = await api.post("/v1/transfers", body, key="retry-1")
    assert first.status == 201 and "Idempotent-Replayed" not in first.headers
    second = await api.post("/v1/transfers", body, key="retry-1")
    assert second.status == 201 and second.headers["Idempotent-Replayed"] == "true"
    assert second.body == first.body
    # The same request with its fields in another order and other spacing is the same.
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2).encode()
    third = await api.post("/v1/transfers", raw=reordered, key="retry-1")
    assert third.status == 201 and third.body == first.body
    # The structured-field form of the key names the same key.
    quoted = await api.post("/v1/transfers", body, key='"retry-1"')
    assert quoted.headers["Idempotent-Replayed"] == "true" and quoted.body == first.body
    assert (await api.balance(world.user))["posted_minor"] == 10_000 - 250

    account = await api.post("/v1/accounts", {"currency": "CNY", "kind": "user"}, key="acct")
    again = await api.post("/v1/accounts", {"currency": "CNY", "kind": "user"}, key="acct")
    assert again.status == 201 and again.body == account.body
    assert again.headers["Idempotent-Replayed"] == "true"

    held = await api.post("/v1/transfers", world.transfer(pending=True))
    path = f"/v1/transfers/{held.json['id']}/post"
    posted = await api.post(path, {"amount_minor": 10}, key="post-1")
    replayed = await api.post(path, {"amount_minor": 10}, key="post-1")
    assert posted.status == replayed.status == 200 and replayed.body == posted.body
    assert replayed.headers["Idempotent-Replayed"] == "true"


async def test_retry_replays_a_stored_failure(api: Api, world: World) -> None:
    body = world.transfer(amount_minor=20_000)
    first = await api.post("/v1/transfers", body, key="too-much")
    assert_problem(first, 422, "insufficient_funds")
    assert (await api.move(world.bank, world.user, 20_000)).status == 201
    second = await api.post("/v1/transfers", body, key="too-much")
    assert_problem(second, 422, "insufficient_funds")
    assert second.body == first.body and second.headers["Idempotent-Replayed"] == "true"
    assert (await api.balance(world.user))["posted_minor"] == 30_000


async def test_same_key_different_request_is_refused(api: Api, world: World) -> None:
    first = await api.post("/v1/transfers", world.transfer(amount_minor=100), key="k")
    assert first.status == 201
    before = await snapshot(api, world)
    other = await api.post("/v1/transfers", world.transfer(amount_minor=101), key="k")
    assert_problem(other, 422, "idempotency_key_reused")
    elsewhere = await api.post("/v1/accounts", {"currency": "CNY", "kind": "user"}, key="k")
    assert_problem(elsewhere, 422, "idempotency_key_reused")
    assert await snapshot(api, world) == before


async def test_idempotency_key_missing_or_too_long(api: Api, world: World) -> None:
    before = await snapshot(api, world)
    missing = await api.post("/v1/transfers", world.transfer(), key=None)
    assert_problem(missing, 400, "idempotency_key_missing")
    too_long = await api.post("/v1/transfers", world.transfer(), key="k" * 256)
    assert_problem(too_long, 400, "idempotency_key_invalid")
    empty = await api.post("/v1/transfers", world.transfer(), key='""')
    assert_problem(empty, 400, "idempotency_key_invalid")
    for path in ("/v1/accounts", "/v1/transfer_groups"):
        assert_problem(await api.post(path, {}, key=None), 400, "validation_error")
    no_key = await api.post("/v1/accounts", {"currency": "CNY", "kind": "user"}, key=None)
    assert_problem(no_key, 400, "idempotency_key_missing")
    assert await snapshot(api, world) == before
    longest = await api.post("/v1/transfers", world.transfer(), key="k" * 255)
    assert longest.status == 201


# -- bad input -----------------------------------------------------------------------------

BodyOf = Callable[[World], bytes]


def _json(make: Callable[[World], Any]) -> BodyOf:
    return lambda w: json.dumps(make(w)).encode()


def _amount(token: str) -> BodyOf:
    """A transfer whose amount_minor is the raw JSON `token`."""

    def body(w: World) -> bytes:
        text = json.dumps(w.transfer(amount_minor=0))
        return text.replace('"amount_minor": 0', f'"amount_minor": {token}').encode()

    return body


def _without(name: str) -> BodyOf:
    def body(w: World) -> bytes:
        fields = w.transfer()
        del fields[name]
        return json.dumps(fields).encode()

    return body


_BAD_TRANSFERS: Final[dict[str, tuple[BodyOf, int, str]]] = {
    "malformed json": (lambda w: b'{"debit_account_id": ', 400, "invalid_json"),
    "not json": (lambda w: b"amount=1", 400, "invalid_json"),
    "json array": (_json(lambda w: [w.transfer()]), 400, "validation_error"),
    "json null": (lambda w: b"null", 400, "validation_error"),
    "empty object": (lambda w: b"{}", 400, "validation_error"),
    "empty body": (lambda w: b"", 400, "validation_error"),
    "unknown field": (_json(lambda w: w.transfer(memo="hi")), 400, "validation_error"),
    "missing amount": (_without("amount_minor"), 400, "validation_error"),
    "missing currency": (_without("currency"), 400, "validation_error"),
    "pending not bool": (_json(lambda w: w.transfer(pending="yes")), 400, "validation_error"),
    "id as number": (
        _json(lambda w: w.transfer(debit_account_id=int(w.user))),
        400,
        "validation_error",
    ),
    "metadata value not string": (
        _json(lambda w: w.transfer(metadata={"a": 1})),
        400,
        "validation_error",
    ),
    # jsonb refuses NUL: let through, it would fail the whole batch with a 500.
    "metadata value with NUL": (
        _json(lambda w: w.transfer(metadata={"note": "a\u0000b"})),
        400,
        "validation_error",
    ),
    "metadata key with NUL": (
        _json(lambda w: w.transfer(metadata={"\u0000": "x"})),
        400,
        "validation_error",
    ),
    "amount zero": (_amount("0"), 400, "validation_error"),
    "amount negative": (_amount("-5"), 400, "validation_error"),
    "amount fractional": (_amount("1.5"), 400, "validation_error"),
    "amount exponent": (_amount("1e3"), 400, "validation_error"),
    "amount integral float": (_amount("100.0"), 400, "validation_error"),
    "amount as string": (_amount('"100"'), 400, "validation_error"),
    "amount above int64": (_amount("9223372036854775808"), 400, "validation_error"),
    "amount null": (_amount("null"), 400, "validation_error"),
    "currency unknown": (_json(lambda w: w.transfer(currency="XXX")), 400, "validation_error"),
    "currency lowercase": (_json(lambda w: w.transfer(currency="cny")), 400, "validation_error"),
    "currency not a string": (_json(lambda w: w.transfer(currency=156)), 400, "validation_error"),
    "to self": (
        _json(lambda w: w.transfer(credit_account_id=w.user)),
        400,
        "validation_error",
    ),
    "unknown credit account": (
        _json(lambda w: w.transfer(credit_account_id=UNKNOWN_ID)),
        404,
        "account_not_found",
    ),
    "unknown debit account": (
        _json(lambda w: w.transfer(debit_account_id=UNKNOWN_ID)),
        404,
        "account_not_found",
    ),
    "id not digits": (
        _json(lambda w: w.transfer(credit_account_id="abc")),
        400,
        "validation_error",
    ),
    "id zero": (_json(lambda w: w.transfer(credit_account_id="0")), 400, "validation_error"),
    "id negative": (_json(lambda w: w.transfer(credit_account_id="-1")), 400, "validation_error"),
    "id with newline": (
        _json(lambda w: w.transfer(credit_account_id=w.merchant + "\n")),
        400,
        "validation_error",
    ),
    "id above int64": (
        _json(lambda w: w.transfer(credit_account_id="9223372036854775808")),
        400,
        "validation_error",
    ),
    "id of 20 digits": (
        _json(lambda w: w.transfer(credit_account_id="1" * 20)),
        400,
        "validation_error",
    ),
    "timeout without pending": (
        _json(lambda w: w.transfer(timeout_s=60)),
        400,
        "validation_error",
    ),
    "timeout zero": (
        _json(lambda w: w.transfer(pending=True, timeout_s=0)),
        400,
        "validation_error",
    ),
    "insufficient funds": (
        _json(lambda w: w.transfer(amount_minor=10_001)),
        422,
        "insufficient_funds",
    ),
    "currency mismatch": (
        _json(lambda w: w.transfer(credit_account_id=w.dollars)),
        422,
        "currency_mismatch",
    ),
    "currency of neither account": (
        _json(lambda w: w.transfer(currency="USD")),
        422,
        "currency_mismatch",
    ),
    "body over the limit": (
        _json(lambda w: w.transfer(metadata={"note": "x" * BODY_SIZE_MAX})),
        413,
        "body_too_large",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_TRANSFERS))
async def test_bad_transfer_is_refused_and_writes_nothing(
    shared: tuple[Api, World], case: str
) -> None:
    api, world = shared
    make, status, code = _BAD_TRANSFERS[case]
    before = await snapshot(api, world)
    reply = await api.post("/v1/transfers", raw=make(world))
    body = assert_problem(reply, status, code)
    if code == "validation_error":
        assert body["errors"] and body["errors"][0]["path"].startswith("$")
    after = await snapshot(api, world)
    if status in (404, 422):
        # The ledger refused a valid request: its answer is kept for retries, nothing else.
        assert after.pop("keys") == before.pop("keys") + 1
    assert after == before
    assert (await api.balance(world.user))["posted_minor"] == 10_000


async def test_bad_accounts_and_commands_write_nothing(api: Api, world: World) -> None:
    before = await snapshot(api, world)
    for account, code in [
        ({"currency": "XXX", "kind": "user"}, "validation_error"),
        ({"currency": "cny", "kind": "user"}, "validation_error"),
        ({"currency": "CNY", "kind": "god"}, "validation_error"),
        ({"currency": "CNY", "kind": "user", "overdraft_allowed": True}, "validation_error"),
        ({"currency": "CNY"}, "validation_error"),
        ([{"currency": "CNY", "kind": "user"}], "validation_error"),
    ]:
        assert_problem(await api.post("/v1/accounts", account), 400, code)
    for group, code in [
        ({"transfers": []}, "validation_error"),
        ({"transfers": [world.transfer()] * 65}, "validation_error"),
        ({"transfers": [world.transfer(), world.transfer(currency="XXX")]}, "validation_error"),
        ({"transfers": [world.transfer(), world.transfer(amount_minor=1.5)]}, "validation_error"),
    ]:
        reply = await api.post("/v1/transfer_groups", group)
        assert_problem(reply, 400, code)
    float_path = (await api.post("/v1/transfer_groups", group)).json["errors"][0]["path"]
    assert float_path == "$.transfers[1].amount_minor"

    wrong_type = await api.post(
        "/v1/accounts", raw=b'{"currency": "CNY", "kind": "user"}', content_type="text/plain"
    )
    assert_problem(wrong_type, 415, "unsupported_media_type")
    form = await api.post(
        "/v1/transfers",
        raw=b"amount_minor=1",
        content_type="application/x-www-form-urlencoded",
    )
    assert_problem(form, 415, "unsupported_media_type")

    held = await api.post("/v1/transfers", world.transfer(pending=True))
    hold_path = f"/v1/transfers/{held.json['id']}"
    before = await snapshot(api, world)
    for body in ({"amount_minor": 0}, {"amount_minor": -1}, {"amount_minor": "5"}, {"x": 1}):
        assert_problem(await api.post(f"{hold_path}/post", body), 400, "validation_error")
    assert_problem(await api.post(f"{hold_path}/void", {"reason": "x"}), 400, "validation_error")
    for path in ("/v1/transfers/abc/post", "/v1/transfers/0/void", "/v1/transfers/-1/post"):
        assert_problem(await api.post(path), 404, "transfer_not_found")
    assert await snapshot(api, world) == before
    assert (await api.get(hold_path)).json["status"] == "pending"


async def test_hold_resolution_conflicts(api: Api, world: World) -> None:
    held = await api.post("/v1/transfers", world.transfer(amount_minor=400, pending=True))
    hold_path = f"/v1/transfers/{held.json['id']}"
    too_much = await api.post(f"{hold_path}/post", {"amount_minor": 401})
    assert_problem(too_much, 422, "post_amount_exceeds_pending")
    assert (await api.post(f"{hold_path}/void")).status == 200
    before = await snapshot(api, world)
    assert_problem(await api.post(f"{hold_path}/void"), 409, "transfer_already_resolved")
    assert_problem(await api.post(f"{hold_path}/post"), 409, "transfer_already_resolved")
    after = await snapshot(api, world)
    assert after.pop("keys") == before.pop("keys") + 2
    assert after == before

    immediate = await api.post("/v1/transfers", world.transfer())
    refused = await api.post(f"/v1/transfers/{immediate.json['id']}/void")
    assert_problem(refused, 409, "transfer_not_pending")
    unknown = await api.post(f"/v1/transfers/{UNKNOWN_ID}/post")
    assert_problem(unknown, 404, "transfer_not_found")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/accounts/abc", 404, "account_not_found"),
        ("GET", "/v1/accounts/0", 404, "account_not_found"),
        ("GET", "/v1/accounts/-5", 404, "account_not_found"),
        ("GET", "/v1/accounts/9223372036854775808", 404, "account_not_found"),
        ("GET", "/v1/accounts/99999999999999999999", 404, "account_not_found"),
        ("GET", f"/v1/accounts/{UNKNOWN_ID}", 404, "account_not_found"),
        ("GET", f"/v1/accounts/{UNKNOWN_ID}/entries", 404, "account_not_found"),
        ("GET", "/v1/accounts/x1/entries", 404, "account_not_found"),
        ("GET", "/v1/transfers/abc", 404, "transfer_not_found"),
        ("GET", "/v1/transfers/9223372036854775808", 404, "transfer_not_found"),
        ("GET", f"/v1/transfers/{UNKNOWN_ID}", 404, "transfer_not_found"),
        ("GET", "/{user}/entries?limit=0", 400, "validation_error"),
        ("GET", "/{user}/entries?limit=101", 400, "validation_error"),
        ("GET", "/{user}/entries?limit=-1", 400, "validation_error"),
        ("GET", "/{user}/entries?limit=ten", 400, "validation_error"),
        ("GET", "/{user}/entries?limit=%C2%B2", 400, "validation_error"),  # "²"
        ("GET", "/{user}/entries?limit=", 400, "validation_error"),
        ("GET", f"/{{user}}/entries?starting_after={UNKNOWN_ID}", 400, "invalid_cursor"),
        ("GET", "/{user}/entries?starting_after=abc", 400, "invalid_cursor"),
        ("GET", "/{user}/entries?starting_after=0", 400, "invalid_cursor"),
        ("GET", "/{user}/entries?starting_after=9223372036854775808", 400, "invalid_cursor"),
        ("GET", "/v2/accounts", 404, "not_found"),
        ("GET", "/", 404, "not_found"),
        ("POST", "/v1/nothing", 404, "not_found"),
        ("GET", "/problems/no_such_problem", 404, "not_found"),
        ("DELETE", "/v1/accounts", 405, "method_not_allowed"),
        ("GET", "/v1/transfers", 405, "method_not_allowed"),
        ("PUT", "/v1/transfers/{transfer}/post", 405, "method_not_allowed"),
        ("POST", "/v1/accounts/{account}", 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
    ],
)
async def test_bad_paths_and_queries(
    shared: tuple[Api, World], method: str, path: str, status: int, code: str
) -> None:
    api, world = shared
    path = path.replace("/{user}", f"/v1/accounts/{world.user}")
    path = path.replace("{account}", world.user).replace("{transfer}", UNKNOWN_ID)
    before = await snapshot(api, world)
    reply = await api.call(method, path)
    assert_problem(reply, status, code)
    if status == 405:
        assert reply.headers.get("Allow"), "RFC 9110: a 405 response lists the allowed methods"
    assert await snapshot(api, world) == before


# -- headers, operations -------------------------------------------------------------------


async def test_request_id_echoed_or_generated(api: Api) -> None:
    echoed = await api.get("/healthz", headers={"X-Request-Id": "req-42.a:b_c"})
    assert echoed.headers["X-Request-Id"] == "req-42.a:b_c"
    failed = await api.get("/v1/accounts/abc", headers={"X-Request-Id": "req-43"})
    assert failed.status == 404 and failed.headers["X-Request-Id"] == "req-43"

    generated = {(await api.get("/healthz")).headers["X-Request-Id"] for _ in range(3)}
    assert len(generated) == 3 and all(len(g) == 32 for g in generated)
    not_ours = await api.get("/healthz", headers={"X-Request-Id": "has spaces in it"})
    assert not_ours.headers["X-Request-Id"] not in ("has spaces in it", "")
    unmatched = await api.get("/nowhere")
    assert unmatched.status == 404 and unmatched.headers["X-Request-Id"]


async def test_health_and_readiness(api: Api) -> None:
    health = await api.get("/healthz")
    assert health.status == 200 and health.json["status"] == "ok"
    ready = await api.get("/readyz")
    assert ready.status == 200 and ready.json["status"] == "ready"


async def test_metrics_are_exposed(api: Api, world: World) -> None:
    await api.get(f"/v1/accounts/{world.user}")
    reply = await api.get("/metrics")
    assert reply.status == 200 and reply.content_type == "text/plain"
    text = reply.body.decode()
    for sample in (
        "txengine_http_requests_total{",
        'route="/v1/accounts/{account_id}"',
        "txengine_batch_size_count ",
        "txengine_batch_commit_duration_seconds_count ",
        'txengine_command_results_total{result="ok"}',
        "txengine_lane_queue_depth ",
    ):
        assert sample in text, sample


async def test_problem_types_are_described(api: Api) -> None:
    for code, problem_type in PROBLEM_TYPES.items():
        reply = await api.get(f"/problems/{code}")
        assert reply.status == 200, code
        assert str(problem_type.status) in reply.body.decode()


# -- the OpenAPI document ------------------------------------------------------------------


async def test_router_and_document_list_the_same_operations(api: Api) -> None:
    reply = await api.get("/openapi.json")
    assert reply.status == 200
    served = reply.json
    assert served == DOCUMENT
    app = api.client.server.app
    assert app is not None
    routed = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method.upper(), path) for path, ops in served["paths"].items() for method in ops}
    assert routed == documented
    jsonschema.Draft202012Validator.check_schema({"$defs": served["components"]["schemas"]})


async def test_real_responses_match_the_document(api: Api, world: World) -> None:
    covered: set[tuple[str, str]] = set()

    async def check(method: str, template: str, path: str, body: Any = None) -> Reply:
        if body is not None:
            validate_request(template, body)
        reply = await api.call(method, path, body)
        validate_response(method, template, reply)
        covered.add((method, template))
        return reply

    account = await check(
        "POST", "/v1/accounts", "/v1/accounts", {"currency": "CNY", "kind": "user"}
    )
    account_id = account.json["id"]
    await check("GET", "/v1/accounts/{account_id}", f"/v1/accounts/{account_id}")
    transfer = await check("POST", "/v1/transfers", "/v1/transfers", world.transfer())
    hold = await check(
        "POST", "/v1/transfers", "/v1/transfers", world.transfer(pending=True, timeout_s=60)
    )
    other = await check("POST", "/v1/transfers", "/v1/transfers", world.transfer(pending=True))
    await check("GET", "/v1/transfers/{transfer_id}", f"/v1/transfers/{transfer.json['id']}")
    await check(
        "POST",
        "/v1/transfers/{transfer_id}/post",
        f"/v1/transfers/{hold.json['id']}/post",
        {"amount_minor": 1},
    )
    await check(
        "POST", "/v1/transfers/{transfer_id}/void", f"/v1/transfers/{other.json['id']}/void", {}
    )
    await check(
        "POST",
        "/v1/transfer_groups",
        "/v1/transfer_groups",
        {"transfers": [world.transfer(), world.transfer(credit_account_id=account_id)]},
    )
    await check(
        "GET", "/v1/accounts/{account_id}/entries", f"/v1/accounts/{world.user}/entries?limit=2"
    )
    await api.set_account_rules(world.user, step_up_threshold_minor=150)
    step_up = await check(
        "POST", "/v1/transfers", "/v1/transfers", world.transfer(amount_minor=151)
    )
    assert step_up.status == 202, step_up
    code = await api.step_up_code(step_up.json["id"])
    confirmed = await check(
        "POST",
        "/v1/step-ups/{step_up_id}/confirm",
        f"/v1/step-ups/{step_up.json['id']}/confirm",
        {"code": code},
    )
    assert confirmed.status == 201, confirmed
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        await check("GET", path, path)
    await check("GET", "/problems/{code}", "/problems/insufficient_funds")
    today = api.engine.clock().date()
    await check(
        "GET",
        "/v1/accounts/{account_id}/statements/{date}",
        f"/v1/accounts/{world.user}/statements/{today}.csv",
    )
    delivery_id = await queue_delivery(
        api.engine, "http://127.0.0.1:1/notify", scope=DEFAULT_PARTNER
    )
    await check("GET", "/v1/webhook_deliveries", "/v1/webhook_deliveries?status=pending")
    await check(
        "POST",
        "/v1/webhook_deliveries/{delivery_id}/redeliver",
        f"/v1/webhook_deliveries/{delivery_id}/redeliver",
        {},
    )
    assert covered == {
        (method.upper(), path)
        for path, ops in DOCUMENT["paths"].items()
        for method in ops
        if not path.startswith(PRODUCT_PATHS)
    }

    # Problems are documented as the default response of every operation.
    for method, template, path, body in [
        ("GET", "/v1/accounts/{account_id}", f"/v1/accounts/{UNKNOWN_ID}", None),
        ("POST", "/v1/transfers", "/v1/transfers", world.transfer(amount_minor=10**9)),
        ("POST", "/v1/transfers/{transfer_id}/void", f"/v1/transfers/{UNKNOWN_ID}/void", {}),
        (
            "GET",
            "/v1/accounts/{account_id}/entries",
            f"/v1/accounts/{world.user}/entries?limit=0",
            None,
        ),
    ]:
        reply = await api.call(method, path, body)
        assert reply.status >= 400
        validate_response(method, template, reply)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("account", "/v1/accounts/{account}"),
        ("entries", "/v1/accounts/{account}/entries"),
        ("transfer", "/v1/transfers/{transfer}"),
    ],
)
async def test_reads_answer_503_when_the_database_connection_breaks(
    api: Api, world: World, monkeypatch: pytest.MonkeyPatch, method: str, path: str
) -> None:
    """Found by the fault suite: a read whose pooled connection died with PostgreSQL
    answered 500; it must answer the `unavailable` problem that says "retry"."""
    transfer = (await api.move(world.bank, world.user, 5)).json["id"]

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise Unavailable("08003: connection was closed in the middle of operation")

    monkeypatch.setattr(api.engine, method, broken)
    reply = await api.get(path.format(account=world.user, transfer=transfer))
    assert_problem(reply, 503, "unavailable")
    assert reply.headers["Retry-After"] == "2"
    validate_response(
        "GET",
        path.replace("{account}", "{account_id}").replace("{transfer}", "{transfer_id}"),
        reply,
    )
