"""Partner authentication: unsigned, malformed, unknown, stale, replayed, forged and
disabled requests are refused with a 401 naming the check, and change nothing; rotation,
RSA2 and the public routes; rate limits across processes."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine import partners as partner_store
from engine.partners import PartnerStatus, SecretBox
from gateway.auth import CREDENTIALS_TTL_S
from gateway.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Signer
from tests.gateway.support import (
    DEFAULT_PARTNER,
    TEST_SECRET_KEY,
    Api,
    World,
    add_partner,
    assert_problem,
    serving,
    snapshot,
    validate_response,
)

BOX = SecretBox(TEST_SECRET_KEY.encode())


def _headers_of(
    api: Api, method: str, path: str, body: bytes = b"", *, key: str = "", **kw: Any
) -> dict[str, str]:
    """Signature headers for a request sent with Idempotency-Key `key` ("" for none)."""
    return api.signer.headers(method, path, body, idempotency_key=key, **kw)


async def _refused(api: Api, world: World, reply_factory: Any, code: str) -> dict[str, Any]:
    """The reply of `reply_factory()` is a 401 `code` and nothing changed."""
    before = await snapshot(api, world)
    reply = await reply_factory()
    body = assert_problem(reply, 401, code)
    assert reply.headers["WWW-Authenticate"].startswith("TXENGINE-SIGNATURE")
    assert await snapshot(api, world) == before
    return body


async def test_unsigned_request_is_refused(api: Api, world: World) -> None:
    body = await _refused(
        api,
        world,
        lambda: api.post("/v1/transfers", world.transfer(), sign=False),
        "missing_signature",
    )
    assert body["instance"] == "/v1/transfers"
    for path in (f"/v1/accounts/{world.user}", "/v1", "/v1/no_such_route"):
        assert_problem(await api.get(path, sign=False), 401, "missing_signature")


@pytest.mark.parametrize(
    "dropped", ["X-Partner-Id", TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER]
)
async def test_each_missing_header_is_named(api: Api, dropped: str) -> None:
    headers = _headers_of(api, "GET", "/v1/accounts/1")
    del headers[dropped]
    reply = await api.get("/v1/accounts/1", sign=False, headers=headers)
    body = assert_problem(reply, 401, "missing_signature")
    assert dropped in body["detail"]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (SIGNATURE_HEADER, "not base64!"),
        (SIGNATURE_HEADER, ""),
        (NONCE_HEADER, "short"),
        (NONCE_HEADER, "x" * 65),
        (NONCE_HEADER, "has spaces in it ok"),
        (TIMESTAMP_HEADER, "-5"),
        (TIMESTAMP_HEADER, "1e9"),
        (TIMESTAMP_HEADER, "1" * 13),
    ],
)
async def test_malformed_headers_are_refused(api: Api, header: str, value: str) -> None:
    headers = {**_headers_of(api, "GET", "/v1/accounts/1"), header: value}
    assert_problem(
        await api.get("/v1/accounts/1", sign=False, headers=headers), 401, "malformed_signature"
    )


async def test_unknown_partner_is_refused(api: Api, world: World) -> None:
    stranger = Signer.hmac("nobody", "sk_" + "x" * 40)
    await _refused(
        api,
        world,
        lambda: api.as_partner(stranger).post("/v1/transfers", world.transfer()),
        "unknown_partner",
    )
    bad_id = {"X-Partner-Id": "Not A Valid Id"}
    assert_problem(await api.get("/v1/accounts/1", headers=bad_id), 401, "unknown_partner")


@pytest.mark.parametrize("skew_s", [-301, 301, -10_000_000])
async def test_stale_timestamps_are_refused(api: Api, world: World, skew_s: int) -> None:
    async def send() -> Any:
        body = world.transfer()
        raw = json.dumps(body).encode()
        headers = _headers_of(
            api, "POST", "/v1/transfers", raw, timestamp=int(time.time()) + skew_s
        )
        return await api.post("/v1/transfers", raw=raw, sign=False, headers=headers)

    await _refused(api, world, send, "stale_timestamp")


@pytest.mark.parametrize("skew_s", [-290, 290])
async def test_timestamps_within_the_window_are_accepted(
    api: Api, world: World, skew_s: int
) -> None:
    headers = _headers_of(
        api, "GET", f"/v1/accounts/{world.user}", timestamp=int(time.time()) + skew_s
    )
    reply = await api.get(f"/v1/accounts/{world.user}", sign=False, headers=headers)
    assert reply.status == 200, reply


async def test_a_replayed_nonce_is_refused(api: Api, world: World) -> None:
    raw = json.dumps(world.transfer()).encode()
    headers = _headers_of(api, "POST", "/v1/transfers", raw, key="replay-1")
    first = await api.post("/v1/transfers", raw=raw, sign=False, headers=headers, key="replay-1")
    assert first.status == 201, first
    # The very same bytes again, as an eavesdropper would send them: refused, not replayed
    # from the idempotency record (which would leak the answer to whoever captured it).
    await _refused(
        api,
        world,
        lambda: api.post("/v1/transfers", raw=raw, sign=False, headers=headers, key="replay-1"),
        "replayed_nonce",
    )
    # The same bytes under a fresh key would be a new transfer, and the handler runs while
    # the nonce is being checked: the key is signed, so this is a forgery, refused first.
    await _refused(
        api,
        world,
        lambda: api.post("/v1/transfers", raw=raw, sign=False, headers=headers, key="replay-2"),
        "bad_signature",
    )


async def test_a_nonce_is_shared_by_every_gateway_process(dsn: str) -> None:
    async with serving(dsn) as one, serving(dsn) as two:
        headers = _headers_of(one, "GET", "/v1/accounts/1")
        assert_problem(
            await one.get("/v1/accounts/1", sign=False, headers=headers), 404, "account_not_found"
        )
        assert_problem(
            await two.get("/v1/accounts/1", sign=False, headers=headers), 401, "replayed_nonce"
        )


async def test_concurrent_uses_of_one_nonce_let_exactly_one_through(api: Api) -> None:
    headers = _headers_of(api, "GET", "/v1/accounts/1")
    replies = await asyncio.gather(
        *(api.get("/v1/accounts/1", sign=False, headers=headers) for _ in range(20))
    )
    codes = sorted(r.json["code"] for r in replies)
    assert codes == ["account_not_found"] + ["replayed_nonce"] * 19


def _forgeries(api: Api, world: World) -> dict[str, Any]:
    """Requests whose signature was made for something else."""

    body = json.dumps(world.transfer()).encode()
    other = json.dumps(world.transfer(amount_minor=9_999)).encode()
    wrong_key = Signer.hmac(DEFAULT_PARTNER, "sk_" + "y" * 40)

    key = "forged-1"  # every request below is sent with this key

    def send(raw: bytes, headers: dict[str, str], path: str = "/v1/transfers") -> Any:
        return lambda: api.post(path, raw=raw, sign=False, headers=headers, key=key)

    def signed_for(method: str, path: str, raw: bytes, *, signed_key: str = key) -> Any:
        return _headers_of(api, method, path, raw, key=signed_key)

    signed = signed_for("POST", "/v1/transfers", body)
    flipped = bytearray(base64.b64decode(signed[SIGNATURE_HEADER]))
    flipped[0] ^= 1
    return {
        "body changed": send(other, signed_for("POST", "/v1/transfers", body)),
        "wrong secret": send(
            body, wrong_key.headers("POST", "/v1/transfers", body, idempotency_key=key)
        ),
        "path changed": send(body, signed_for("POST", "/v1/transfer_groups", body)),
        "method changed": send(body, signed_for("PUT", "/v1/transfers", body)),
        "query added": send(body, signed_for("POST", "/v1/transfers", body), "/v1/transfers?x=1"),
        # A replay under a new key would move the money again if the key were not signed.
        "idempotency key changed": send(
            body, signed_for("POST", "/v1/transfers", body, signed_key="another-key")
        ),
        "one bit flipped": send(
            body, {**signed, SIGNATURE_HEADER: base64.b64encode(bytes(flipped)).decode()}
        ),
        "timestamp changed": send(
            body, {**signed, TIMESTAMP_HEADER: str(int(signed[TIMESTAMP_HEADER]) + 1)}
        ),
    }


@pytest.mark.parametrize(
    "forgery",
    [
        "body changed",
        "wrong secret",
        "path changed",
        "method changed",
        "query added",
        "idempotency key changed",
        "one bit flipped",
        "timestamp changed",
    ],
)
async def test_forged_signatures_are_refused(api: Api, world: World, forgery: str) -> None:
    body = await _refused(api, world, _forgeries(api, world)[forgery], "bad_signature")
    secret_text = str(api.signer)  # whatever the signer holds must not be echoed
    assert "sk_" not in str(body) and secret_text not in str(body)


async def test_a_forgery_does_not_burn_the_nonce(api: Api, world: World) -> None:
    """The nonce is recorded only once the signature is proven: a forger who saw a nonce
    in flight cannot get the partner's own request refused as a replay."""
    nonce = "A" * 24
    forged = Signer.hmac(DEFAULT_PARTNER, "sk_" + "z" * 40).headers(
        "GET", f"/v1/accounts/{world.user}", nonce=nonce
    )
    assert_problem(
        await api.get(f"/v1/accounts/{world.user}", sign=False, headers=forged),
        401,
        "bad_signature",
    )
    genuine = _headers_of(api, "GET", f"/v1/accounts/{world.user}", nonce=nonce)
    assert (await api.get(f"/v1/accounts/{world.user}", sign=False, headers=genuine)).status == 200


async def test_query_order_does_not_matter(api: Api, world: World) -> None:
    path = f"/v1/accounts/{world.user}/entries?limit=2&starting_after="
    reply = await api.get(f"/v1/accounts/{world.user}/entries?limit=2")
    assert reply.status == 200
    cursor = reply.json["data"][0]["id"]
    signed = _headers_of(api, "GET", f"{path}{cursor}")
    reordered = f"/v1/accounts/{world.user}/entries?starting_after={cursor}&limit=2"
    reply = await api.get(reordered, sign=False, headers=signed)
    assert reply.status == 200, reply
    validate_response("GET", "/v1/accounts/{account_id}/entries", reply)


async def test_public_routes_need_no_signature(api: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/problems/bad_signature"):
        reply = await api.get(path, sign=False)
        assert reply.status == 200, (path, reply)


async def test_refusals_are_counted(api: Api) -> None:
    await api.get("/v1/accounts/1", sign=False)
    metrics = (await api.get("/metrics", sign=False)).body.decode()
    assert 'txengine_auth_refusals_total{code="missing_signature"}' in metrics


async def test_a_disabled_partner_is_refused(api: Api, world: World) -> None:
    async with api.engine.pool.acquire() as conn:
        await partner_store.set_status(
            conn, partner_id=DEFAULT_PARTNER, status=PartnerStatus.DISABLED, actor="operator:t"
        )
    await asyncio.sleep(CREDENTIALS_TTL_S + 0.1)
    assert_problem(await api.get(f"/v1/accounts/{world.user}"), 401, "partner_disabled")
    async with api.engine.pool.acquire() as conn:
        await partner_store.set_status(
            conn, partner_id=DEFAULT_PARTNER, status=PartnerStatus.ACTIVE, actor="operator:t"
        )
    await asyncio.sleep(CREDENTIALS_TTL_S + 0.1)
    assert (await api.get(f"/v1/accounts/{world.user}")).status == 200


async def test_rotation_keeps_the_old_secret_for_the_overlap(api: Api, world: World) -> None:
    async with api.engine.pool.acquire() as conn:
        second = await partner_store.rotate(
            conn, BOX, partner_id=DEFAULT_PARTNER, actor="operator:t"
        )
    assert second is not None
    new = api.as_partner(Signer.hmac(DEFAULT_PARTNER, second))
    await asyncio.sleep(CREDENTIALS_TTL_S + 0.1)
    assert (await api.get(f"/v1/accounts/{world.user}")).status == 200  # old, in its overlap
    assert (await new.get(f"/v1/accounts/{world.user}")).status == 200
    async with api.engine.pool.acquire() as conn:
        third = await partner_store.rotate(
            conn, BOX, partner_id=DEFAULT_PARTNER, actor="operator:t", overlap_s=0
        )
    assert third is not None
    await asyncio.sleep(CREDENTIALS_TTL_S + 0.1)
    newest = api.as_partner(Signer.hmac(DEFAULT_PARTNER, third))
    assert (await newest.get(f"/v1/accounts/{world.user}")).status == 200
    # The first is still in its day-long overlap; the second was revoked by overlap_s=0.
    assert (await api.get(f"/v1/accounts/{world.user}")).status == 200
    assert_problem(await new.get(f"/v1/accounts/{world.user}"), 401, "bad_signature")


async def test_an_rsa2_partner_signs_with_its_private_key(api: Api) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    async with api.engine.pool.acquire() as conn:
        secret = await partner_store.create(
            conn,
            BOX,
            partner_id="rsa-shop",
            name="rsa",
            actor="operator:t",
            public_key_pem=public.decode(),
        )
    assert secret is None
    shop = api.as_partner(Signer.rsa2("rsa-shop", pem))
    reply = await shop.post("/v1/accounts", {"currency": "CNY", "kind": "merchant"})
    assert reply.status == 201, reply
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    impostor = Signer.rsa2(
        "rsa-shop",
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    assert_problem(
        await api.as_partner(impostor).get(f"/v1/accounts/{reply.json['id']}"), 401, "bad_signature"
    )


async def test_rate_limit_holds_across_processes(dsn: str) -> None:
    async with serving(dsn) as one, serving(dsn) as two:
        limited = await add_partner(one.engine, "slow-shop", rate_per_s=2, burst=5)
        apis = [one.as_partner(limited), two.as_partner(limited)]
        started = time.monotonic()
        replies = await asyncio.gather(*(apis[i % 2].get("/v1/accounts/1") for i in range(30)))
        elapsed_s = time.monotonic() - started
        allowed = [r for r in replies if r.status == 404]
        refused = [r for r in replies if r.status == 429]
        assert len(allowed) + len(refused) == 30
        # The shared bucket held 5 tokens and refills 2 a second: never more than that.
        assert 5 <= len(allowed) <= 5 + int(2 * elapsed_s) + 1, (len(allowed), elapsed_s)
        for reply in refused:
            assert_problem(reply, 429, "rate_limited")
            assert int(reply.headers["Retry-After"]) >= 1
        # Other partners are not affected.
        assert (await one.get("/v1/accounts/1")).status == 404
        await asyncio.sleep(1.0)
        assert (await apis[0].get("/v1/accounts/1")).status == 404  # refilled


async def test_limits_can_be_changed(api: Api) -> None:
    limited = api.as_partner(await add_partner(api.engine, "tiny-shop", rate_per_s=1, burst=1))
    assert (await limited.get("/v1/accounts/1")).status == 404
    assert (await limited.get("/v1/accounts/1")).status == 429
    async with api.engine.pool.acquire() as conn:
        await partner_store.set_limits(
            conn, partner_id="tiny-shop", rate_per_s=1000, burst=1000, actor="operator:t"
        )
    await asyncio.sleep(CREDENTIALS_TTL_S + 0.1)
    assert (await limited.get("/v1/accounts/1")).status == 404


async def test_concurrent_copies_of_a_signed_post_move_money_once(api: Api, world: World) -> None:
    """The nonce check runs beside the handler: copies that race the original are
    answered 401 only, and the engine applies the key's transfer once."""
    raw = json.dumps(world.transfer(amount_minor=3)).encode()
    headers = {
        **_headers_of(api, "POST", "/v1/transfers", raw, key="race-1"),
        "Idempotency-Key": "race-1",
    }
    before = await api.balance(world.merchant)
    replies = await asyncio.gather(
        *(
            api.post("/v1/transfers", raw=raw, sign=False, key=None, headers=headers)
            for _ in range(10)
        )
    )
    assert sorted(r.status for r in replies) == [201] + [401] * 9
    for reply in replies:
        if reply.status == 401:
            assert_problem(reply, 401, "replayed_nonce")
    after = await api.balance(world.merchant)
    assert after["posted_minor"] == before["posted_minor"] + 3
