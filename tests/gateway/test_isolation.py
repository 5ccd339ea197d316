"""Tenant isolation: a partner sees and moves only what it created.

The route test is generic: it walks every path of /openapi.json that has a path
parameter, every method of it, and asks as partner B for what partner A owns. B must get
exactly what an id that does not exist gets (404, never 403 or the thing itself), and A's
things must not change. A route added later is covered as soon as it is in the document;
if it brings a new kind of path parameter, `test_every_path_parameter_has_an_owner` fails
until `_owned_by` learns to make one.
"""

from __future__ import annotations

import re
from typing import Any, Final

from tests.gateway.support import (
    DOCUMENT,
    UNKNOWN_ID,
    Api,
    add_partner,
    assert_problem,
    make_world,
)

_PARAMETER: Final = re.compile(r"\{(\w+)\}")


def _templates() -> list[tuple[str, str]]:
    """(method, path template) of every operation with a path parameter under /v1."""
    return [
        (method.upper(), template)
        for template, operations in DOCUMENT["paths"].items()
        if template.startswith("/v1/") and _PARAMETER.search(template)
        for method in operations
    ]


async def _owned_by(api: Api) -> dict[str, str]:
    """An id of each path parameter's kind, owned by `api`'s partner."""
    world = await make_world(api)
    hold = await api.move(world.user, world.merchant, 100, pending=True)
    assert hold.status == 201, hold
    return {"account_id": world.user, "transfer_id": hold.json["id"]}


def _fill(template: str, ids: dict[str, str]) -> str:
    return _PARAMETER.sub(lambda m: ids[m.group(1)], template)


async def _state(api: Api, ids: dict[str, str]) -> dict[str, Any]:
    return {
        "account": (await api.get(f"/v1/accounts/{ids['account_id']}")).json,
        "transfer": (await api.get(f"/v1/transfers/{ids['transfer_id']}")).json,
        "counts": await api.counts(),
    }


def test_every_path_parameter_has_an_owner() -> None:
    known = {"account_id", "transfer_id"}
    for _, template in _templates():
        for name in _PARAMETER.findall(template):
            assert name in known, f"{template}: teach _owned_by to make a {name}"


async def test_another_partners_ids_are_not_found_on_every_route(api: Api) -> None:
    mine = await _owned_by(api)
    other = api.as_partner(await add_partner(api.engine, "other-shop"))
    unknown = dict.fromkeys(mine, UNKNOWN_ID)
    before = await _state(api, mine)
    tried = 0
    for method, template in _templates():
        body = {} if method == "POST" else None
        foreign = await other.call(method, _fill(template, mine), body)
        missing = await other.call(method, _fill(template, unknown), body)
        assert foreign.status == 404, (method, template, foreign)
        assert (foreign.status, foreign.json["code"]) == (missing.status, missing.json["code"])
        assert foreign.json["code"].endswith("not_found")
        tried += 1
    assert tried >= 5  # today: account, entries, transfer, post, void
    after = await _state(api, mine)
    # The other partner's 404s wrote nothing; only its refusals' idempotency records.
    assert after["account"] == before["account"] and after["transfer"] == before["transfer"]
    assert after["counts"]["transfers"] == before["counts"]["transfers"]
    assert after["counts"]["entries"] == before["counts"]["entries"]


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
