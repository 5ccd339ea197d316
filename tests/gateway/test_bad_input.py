"""Bad input the fuzzers are unlikely to find: numbers at and past the int64 bounds,
numbers in disguise, Unicode tricks in ids, huge and deeply nested bodies, slow and
vanishing clients. Each is refused with a problem (never a 5xx) and changes nothing,
or, for the client that vanishes, is applied wholly or not at all."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.model import INT64_MAX
from tests.gateway.support import (
    BODY_SIZE_MAX,
    Api,
    World,
    assert_problem,
    make_world,
    serving,
    snapshot,
)

TIMEOUT_S = 1.0


@pytest.fixture
async def quick(dsn: str) -> AsyncIterator[tuple[Api, World]]:
    """A server that gives slow clients one second, for headers and for bodies."""
    async with serving(dsn, header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S) as api:
        yield api, await make_world(api)


def _raw_transfer(world: World, amount: str) -> bytes:
    """A transfer body with `amount` spliced in as written, not as Python would encode it."""
    return (
        f'{{"debit_account_id": "{world.user}", "credit_account_id": "{world.merchant}",'
        f' "amount_minor": {amount}, "currency": "CNY"}}'
    ).encode()


async def _refused(api: Api, world: World, raw: bytes, status: int, code: str) -> None:
    before = await snapshot(api, world)
    reply = await api.post("/v1/transfers", raw=raw)
    assert_problem(reply, status, code)
    after = await snapshot(api, world)
    after.pop("keys"), before.pop("keys")  # the refusal's own idempotency record
    assert after == before


@pytest.mark.parametrize(
    "amount",
    [
        str(INT64_MAX + 1),
        str(2**64),
        "-1",
        "0",
        str(-(2**63)),
        str(-(2**63) - 1),
        "1" + "0" * 400,  # a number longer than any integer type
    ],
)
async def test_amounts_out_of_range(api: Api, world: World, amount: str) -> None:
    await _refused(api, world, _raw_transfer(world, amount), 400, "validation_error")


async def test_amount_at_the_int64_bound(api: Api, world: World) -> None:
    """INT64_MAX itself is a valid amount: the user lacks it; a fresh system account can
    pay it once, and one unit more would overflow its totals."""
    reply = await api.post("/v1/transfers", raw=_raw_transfer(world, str(INT64_MAX)))
    assert_problem(reply, 422, "insufficient_funds")
    bank, user = await api.open_account("system"), await api.open_account("user")
    moved = await api.move(bank, user, INT64_MAX)
    assert moved.status == 201 and moved.json["amount_minor"] == INT64_MAX
    assert (await api.balance(user))["posted_minor"] == INT64_MAX
    assert_problem(await api.move(bank, user, 1), 422, "overflow")


@pytest.mark.parametrize(
    "amount", ["1.5", "100.0", "1e2", "1E2", "100e-2", "-0", "0x10", "NaN", "Infinity", "1_000"]
)
async def test_numbers_that_are_not_integers(api: Api, world: World, amount: str) -> None:
    before = await snapshot(api, world)
    reply = await api.post("/v1/transfers", raw=_raw_transfer(world, amount))
    assert reply.status == 400 and reply.json["code"] in ("validation_error", "invalid_json")
    after = await snapshot(api, world)
    after.pop("keys"), before.pop("keys")
    assert after == before


@pytest.mark.parametrize("amount", ['"100"', '"1e2"', "true", "null", "[100]", '{"v": 100}'])
async def test_numbers_in_disguise(api: Api, world: World, amount: str) -> None:
    await _refused(api, world, _raw_transfer(world, amount), 400, "validation_error")


# Ids that look like ids: full-width and Arabic-Indic digits, a right-to-left mark, NUL,
# zero-width space, a leading zero, a sign, white space.
_TRICK_IDS = [
    "１２３４５",
    "١٢٣٤٥",
    "12345\u200f",
    "\u202e12345",
    "123\x0045",
    "123\u200b45",
    "012345",
    "+12345",
    " 12345",
    "12345\n",
]


@pytest.mark.parametrize("trick", _TRICK_IDS)
async def test_unicode_tricks_in_body_ids(api: Api, world: World, trick: str) -> None:
    body = world.transfer(credit_account_id=trick)
    await _refused(api, world, json.dumps(body).encode(), 400, "validation_error")


@pytest.mark.parametrize("trick", _TRICK_IDS)
async def test_unicode_tricks_in_path_ids(api: Api, trick: str) -> None:
    from urllib.parse import quote

    path = f"/v1/accounts/{quote(trick, safe='')}"
    reply = await api.get(path)
    assert_problem(reply, 404, "account_not_found")


@pytest.mark.parametrize("currency", ["СNY", "ＣＮＹ", "CN\u200bY", "cny", "CNY\x00"])
async def test_look_alike_currencies(api: Api, world: World, currency: str) -> None:
    body = world.transfer(currency=currency)
    await _refused(api, world, json.dumps(body).encode(), 400, "validation_error")


@pytest.mark.parametrize(
    "value",
    ["a\x00b", "\u202eevil", b"\xed\xa0\x80", b"\xff", b"\\ud800"],
    ids=["nul", "rtl-override", "utf8-surrogate", "not-utf8", "escaped-surrogate"],
)
async def test_odd_text_in_metadata(api: Api, world: World, value: Any) -> None:
    """PostgreSQL's jsonb cannot hold NUL; lone surrogates are not UTF-8. Refused up front,
    or stored as sent: never a 500."""
    if isinstance(value, bytes):
        raw = _raw_transfer(world, "1")[:-1] + b', "metadata": {"k": "' + value + b'"}}'
    else:
        raw = json.dumps(world.transfer(metadata={"k": value})).encode()
    reply = await api.post("/v1/transfers", raw=raw)
    assert reply.status in (201, 400), reply
    if isinstance(value, bytes) or "\x00" in value:
        assert reply.json["code"] in ("invalid_json", "validation_error")
    elif reply.status == 201:
        assert reply.json["metadata"] == {"k": value}


async def test_a_ten_megabyte_body_is_refused(api: Api, world: World) -> None:
    before = await snapshot(api, world)
    padding = "x" * (10 * 1024 * 1024)
    raw = json.dumps(world.transfer(metadata={"pad": padding})).encode()
    try:
        reply = await api.post("/v1/transfers", raw=raw)
    except OSError:  # the server may close before reading it all: also a refusal
        pass
    else:
        assert_problem(reply, 413, "body_too_large")
    after = await snapshot(api, world)
    after.pop("keys"), before.pop("keys")
    assert after == before


@pytest.mark.parametrize("depth", [100, 10_000, 100_000])
async def test_deeply_nested_json(api: Api, world: World, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    for raw in (
        nested.encode(),
        _raw_transfer(world, "1")[:-1] + b', "metadata": {"k": ' + nested.encode() + b"}}",
        b'{"transfers": ' + nested.encode() + b"}",
    ):
        reply = await api.post("/v1/transfer_groups", raw=raw)
        # Past the body limit (16 KiB in tests) the size is refused before any parsing.
        expected = 413 if len(raw) > BODY_SIZE_MAX else 400
        assert reply.status == expected, reply
        assert reply.json["code"] in ("validation_error", "invalid_json", "body_too_large")


async def _open(api: Api) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = api.client.server
    return await asyncio.open_connection(server.host, server.port)


def _signed_request(api: Api, body: bytes, *, key: str) -> bytes:
    headers = {
        "Host": "localhost",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Idempotency-Key": key,
        **api.signer.headers("POST", "/v1/transfers", body, idempotency_key=key),
    }
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /v1/transfers HTTP/1.1\r\n{head}\r\n".encode() + body


async def test_a_client_sending_a_byte_a_second_is_cut_off(quick: tuple[Api, World]) -> None:
    api, world = quick
    request = _signed_request(api, json.dumps(world.transfer()).encode(), key="slow-head")
    reader, writer = await _open(api)
    started = time.monotonic()
    closed_after_s = None
    try:
        for byte in request[: int(TIMEOUT_S) + 5]:
            writer.write(bytes([byte]))
            await writer.drain()
            if reader.at_eof() or await _closed(reader, wait_s=1.0):
                closed_after_s = time.monotonic() - started
                break
    except ConnectionError:
        closed_after_s = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after_s is not None and closed_after_s < TIMEOUT_S + 3, closed_after_s
    assert (await api.counts())["transfers"] == 1  # only the world's funding


async def _closed(reader: asyncio.StreamReader, *, wait_s: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), wait_s)
    except TimeoutError:
        return False
    return data == b""


async def test_a_body_that_trickles_in_times_out(quick: tuple[Api, World]) -> None:
    api, world = quick
    request = _signed_request(api, json.dumps(world.transfer()).encode(), key="slow-body")
    head_end = request.index(b"\r\n\r\n") + 4
    reader, writer = await _open(api)
    try:
        writer.write(request[: head_end + 5])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), TIMEOUT_S + 3)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert (await api.counts())["transfers"] == 1


@pytest.mark.parametrize("linger_s", [0.0, 0.001, 0.01])
async def test_a_client_that_disconnects_learns_the_outcome_by_retrying(
    api: Api, world: World, linger_s: float
) -> None:
    """The transfer is applied wholly or not at all; a retry with the same key says which."""
    key = f"vanish-{uuid.uuid4().hex}"
    body = json.dumps(world.transfer(amount_minor=7)).encode()
    before = await api.balance(world.merchant)
    _reader, writer = await _open(api)
    writer.write(_signed_request(api, body, key=key))
    await writer.drain()
    await asyncio.sleep(linger_s)
    writer.close()
    await asyncio.sleep(0.2)  # let a batch that took it commit
    retry = await api.post("/v1/transfers", raw=body, key=key)
    assert retry.status == 201, retry
    moved = await api.balance(world.merchant)
    assert moved["posted_minor"] == before["posted_minor"] + 7  # exactly once
    async with api.engine.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM transfers WHERE amount_minor = 7") == 1
