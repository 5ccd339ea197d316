"""QR orders, payment codes and bill payments over HTTP: every route against the OpenAPI
document, the QR images decoded, each illegal step a problem that changes nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import AsyncIterator
from typing import Any

import zxingcpp

from engine.products.orders import EXPIRE_JOB
from engine.reconcile import reconcile
from tests.engine.products.merchant_support import Clock
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

VISA_TEST_CARD = "4111111111111111"


@contextlib.asynccontextmanager
async def _serving(dsn: str, clock: Clock) -> AsyncIterator[Api]:
    """tests.gateway.support.serving (signed as the test partner), on a clock the test moves."""
    async with serving(dsn, clock=clock) as api:
        yield api


@dataclasses.dataclass
class Till:
    api: Api
    world: World
    clock: Clock
    covered: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    async def check(
        self, method: str, template: str, path: str, body: Any = None, **kw: Any
    ) -> Reply:
        """Call the API and validate the request and the reply against the document."""
        if body is not None:
            validate_request(template, body)
        reply = await self.api.call(method, path, body, **kw)
        validate_response(method, template, reply)
        self.covered.add((method, template))
        return reply

    async def precreate(self, **changes: Any) -> dict[str, Any]:
        body = {
            "merchant_account_id": self.world.merchant,
            "out_trade_no": "T_0001",
            "subject": "Iced latte",
            "amount_minor": 2_800,
            "currency": "CNY",
            "timeout_express": "15m",
        }
        body.update(changes)
        reply = await self.check("POST", "/v1/orders", "/v1/orders", body)
        assert reply.status == 201, reply
        order: dict[str, Any] = reply.json
        return order

    async def pay(self, order: dict[str, Any], payer: str | None = None, **kw: Any) -> Reply:
        body = {"qr_code": order["qr_code"], "payer_account_id": payer or self.world.user}
        return await self.check("POST", "/v1/orders/pay", "/v1/orders/pay", body, **kw)

    async def state(self) -> dict[str, Any]:
        """Everything a refused request must leave as it was."""
        state = await snapshot(self.api, self.world)
        del state["keys"]  # a refusal is stored under its key, to be replayed
        async with self.api.engine.pool.acquire() as conn:
            for table in ("orders", "order_refunds", "payment_codes", "billers", "bill_payments",
                          "outbox_events"):  # fmt: skip
                state[table] = [dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
        return state

    async def refused(
        self, status: int, code: str, method: str, template: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        before = await self.state()
        reply = await self.check(method, template, path, body)
        problem = assert_problem(reply, status, code)
        assert await self.state() == before
        return problem


@contextlib.asynccontextmanager
async def _till(dsn: str) -> AsyncIterator[Till]:
    clock = Clock()
    async with _serving(dsn, clock) as api:
        yield Till(api=api, world=await make_world(api), clock=clock)


# -- QR images ------------------------------------------------------------------------------


def _png_pixels(png: bytes) -> memoryview:
    """The grey pixels of a 1-bit greyscale PNG (what segno writes), for the decoder."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        assert (
            zlib.crc32(kind + data)
            == struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])[0]
        )
        header = data if kind == b"IHDR" else header
        idat += data if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert (depth, colour) == (1, 0), (depth, colour)
    raw, stride = zlib.decompress(idat), (width + 7) // 8
    pixels, previous = bytearray(), bytes(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        row = bytes(line[1:])
        if line[0] == 2:  # "up": each byte adds the byte above
            row = bytes((a + b) & 0xFF for a, b in zip(row, previous, strict=True))
        assert line[0] in (0, 2), line[0]
        previous = row
        pixels += bytes(255 if row[x // 8] >> (7 - x % 8) & 1 else 0 for x in range(width))
    return memoryview(pixels).cast("B", shape=[height, width])


async def test_a_qr_payment_end_to_end(dsn: str) -> None:
    async with _till(dsn) as till:
        world = till.world
        order = await till.precreate(notify_url="https://merchant.example/notify")
        assert order["state"] == "WAIT_BUYER_PAY" and order["qr_code"].startswith("txengine://pay/")
        path = f"/v1/orders/{order['id']}"

        png = await till.check("GET", "/v1/orders/{order_id}/qr.png", f"{path}/qr.png")
        assert png.status == 200 and png.content_type == "image/png"
        (decoded,) = zxingcpp.read_barcodes(_png_pixels(png.body))
        assert decoded.text == order["qr_code"]
        svg = await till.check("GET", "/v1/orders/{order_id}/qr.svg", f"{path}/qr.svg")
        assert svg.status == 200 and svg.content_type == "image/svg+xml"
        assert ET.fromstring(svg.body).tag == "{http://www.w3.org/2000/svg}svg"

        paid = await till.pay(order)
        assert paid.status == 200, paid
        assert paid.json["state"] == "TRADE_SUCCESS" and paid.json["payer_account_id"] == world.user
        assert (await till.api.balance(world.user))["posted_minor"] == 10_000 - 2_800
        assert (await till.api.balance(world.merchant))["posted_minor"] == 2_800

        queried = await till.check("GET", "/v1/orders/{order_id}", path)
        assert queried.json == paid.json
        template = "/v1/merchants/{account_id}/orders/{out_trade_no}"
        by_number = await till.check(
            "GET", template, f"/v1/merchants/{world.merchant}/orders/T_0001"
        )
        assert by_number.json == paid.json

        refund = await till.check(
            "POST", "/v1/orders/{order_id}/refunds", f"{path}/refunds",
            {"out_request_no": "R_1", "amount_minor": 800},
        )  # fmt: skip
        assert refund.status == 201, refund
        assert refund.json["order"]["refunded_minor"] == 800

        other = await till.precreate(out_trade_no="T_0002")
        closed = await till.check(
            "POST", "/v1/orders/{order_id}/close", f"/v1/orders/{other['id']}/close", {}
        )
        assert closed.status == 200 and closed.json["state"] == "TRADE_CLOSED"
        assert closed.json["close_reason"] == "closed"

        await _payment_code_flow(till)
        await _bill_flow(till)
        mine = {
            (method.upper(), template)
            for template, ops in DOCUMENT["paths"].items()
            for method in ops
            if template.startswith(("/v1/orders", "/v1/merchants", "/v1/payment_codes", "/v1/bill"))
        }
        assert till.covered >= mine and len(mine) == 13
        async with till.api.engine.pool.acquire() as conn:
            assert [o.name for o in await reconcile(conn) if o.violations] == []


async def _payment_code_flow(till: Till) -> None:
    issued = await till.check(
        "POST", "/v1/payment_codes", "/v1/payment_codes", {"payer_account_id": till.world.user}
    )
    assert issued.status == 201 and len(issued.json["code"]) == 18
    charge = {
        "code": issued.json["code"],
        "merchant_account_id": till.world.merchant,
        "out_trade_no": "TILL_1",
        "subject": "groceries",
        "amount_minor": 500,
        "currency": "CNY",
    }
    charged = await till.check(
        "POST", "/v1/payment_codes/charge", "/v1/payment_codes/charge", charge
    )
    assert charged.status == 201, charged
    assert charged.json["state"] == "TRADE_SUCCESS" and charged.json["source"] == "payment_code"
    assert charged.json["qr_code"] is None
    no_image = await till.api.get(f"/v1/orders/{charged.json['id']}/qr.png")
    assert_problem(no_image, 404, "order_not_found")
    again = dict(charge, out_trade_no="TILL_2")
    await till.refused(
        409, "payment_code_used", "POST", "/v1/payment_codes/charge", "/v1/payment_codes/charge",
        again,
    )  # fmt: skip


async def _bill_flow(till: Till) -> None:
    biller_account = await till.api.open_account("merchant")
    registered = await till.check(
        "POST", "/v1/billers", "/v1/billers",
        {"account_id": biller_account, "name": "Bank card repayment", "biller_type": "credit_card"},
    )  # fmt: skip
    assert registered.status == 201, registered
    assert registered.json["luhn"] is True
    biller_id = registered.json["id"]
    read = await till.check("GET", "/v1/billers/{biller_id}", f"/v1/billers/{biller_id}")
    assert read.json == registered.json
    bill = {
        "biller_id": biller_id,
        "reference": VISA_TEST_CARD,
        "payer_account_id": till.world.user,
        "amount_minor": 1_000,
        "currency": "CNY",
    }
    receipt = await till.check("POST", "/v1/bills/pay", "/v1/bills/pay", bill)
    assert receipt.status == 201, receipt
    assert receipt.json["reference_masked"] == "************1111"
    assert receipt.json["biller_name"] == "Bank card repayment"
    assert (await till.api.balance(biller_account))["posted_minor"] == 1_000
    problem = await till.refused(
        422, "bill_reference_invalid", "POST", "/v1/bills/pay", "/v1/bills/pay",
        dict(bill, reference="4111111111111112"),
    )  # fmt: skip
    assert problem["biller_type"] == "credit_card"


# -- one test per illegal step ------------------------------------------------------------------


async def test_illegal_order_steps_change_nothing(dsn: str) -> None:
    async with _till(dsn) as till:
        world = till.world
        order = await till.precreate()
        assert (await till.pay(order)).status == 200
        pay = {"qr_code": order["qr_code"], "payer_account_id": world.user}
        args = ("POST", "/v1/orders/pay", "/v1/orders/pay")
        problem = await till.refused(409, "order_state_conflict", *args, pay)
        assert problem["state"] == "TRADE_SUCCESS"

        closed = await till.precreate(out_trade_no="T_0002")
        await till.api.post(f"/v1/orders/{closed['id']}/close", {})
        await till.refused(409, "order_state_conflict", *args, dict(pay, qr_code=closed["qr_code"]))

        fresh = await till.precreate(out_trade_no="T_0003")
        dollars = {"qr_code": fresh["qr_code"], "payer_account_id": world.dollars}
        await till.refused(422, "currency_mismatch", *args, dollars)
        unknown_code = "txengine://pay/" + "x" * 22
        await till.refused(404, "order_not_found", *args, dict(pay, qr_code=unknown_code))
        await till.refused(
            409, "out_trade_no_taken", "POST", "/v1/orders", "/v1/orders",
            {"merchant_account_id": world.merchant, "out_trade_no": "T_0001", "subject": "x",
             "amount_minor": 1, "currency": "CNY"},
        )  # fmt: skip
        await till.refused(
            409, "order_state_conflict", "POST", "/v1/orders/{order_id}/close",
            f"/v1/orders/{order['id']}/close", {},
        )  # fmt: skip
        await till.refused(
            409, "refund_exceeds_paid", "POST", "/v1/orders/{order_id}/refunds",
            f"/v1/orders/{order['id']}/refunds", {"out_request_no": "R", "amount_minor": 2_801},
        )  # fmt: skip
        for path in (f"/v1/orders/{UNKNOWN_ID}", f"/v1/orders/{UNKNOWN_ID}/qr.svg",
                     f"/v1/merchants/{world.merchant}/orders/NOPE", "/v1/orders/abc"):  # fmt: skip
            assert_problem(await till.api.get(path), 404, "order_not_found")


async def test_bad_requests_are_validation_problems(dsn: str) -> None:
    async with _till(dsn) as till:
        order = {
            "merchant_account_id": till.world.merchant,
            "out_trade_no": "T_1",
            "subject": "x",
            "amount_minor": 1,
            "currency": "CNY",
        }
        for change in ({"out_trade_no": "has-dash"}, {"out_trade_no": "x" * 65},
                       {"timeout_express": "16d"}, {"timeout_express": "0m"},
                       {"timeout_express": "1s"}, {"currency": "XXY"}, {"amount_minor": 0},
                       {"notify_url": "ftp://x"}, {"unknown": 1},
                       {"subject": "latte\x00"}):  # fmt: skip
            reply = await till.api.post("/v1/orders", dict(order, **change))
            assert_problem(reply, 400, "validation_error")
        biller = {"account_id": till.world.merchant, "name": "x", "biller_type": "utility"}
        bad_pattern = await till.api.post("/v1/billers", dict(biller, reference_pattern="[0-9"))
        assert_problem(bad_pattern, 400, "validation_error")
        assert_problem(await till.api.post("/v1/billers", dict(biller, biller_type="gas")), 400,
                       "validation_error")  # fmt: skip
        short = {"code": "28123", "merchant_account_id": till.world.merchant, "out_trade_no": "A",
                 "subject": "x", "amount_minor": 1, "currency": "CNY"}  # fmt: skip
        assert_problem(await till.api.post("/v1/payment_codes/charge", short), 400,
                       "validation_error")  # fmt: skip
        missing_key = await till.api.post("/v1/orders", order, key=None)
        assert_problem(missing_key, 400, "idempotency_key_missing")
        # Found by schemathesis: a NUL in a scanned code reached PostgreSQL (a 500).
        for scanned in ("\ud899\udc47\x00", "txengine://pay/" + "A" * 21 + "\x00", "x" * 23):
            body = {"qr_code": scanned, "payer_account_id": till.world.user}
            reply = await till.api.post("/v1/orders/pay", raw=json.dumps(body).encode())
            assert_problem(reply, 400, "validation_error")


async def test_a_retried_payment_is_answered_once(dsn: str) -> None:
    async with _till(dsn) as till:
        order = await till.precreate()
        first = await till.pay(order, key="pay-1")
        again = await till.pay(order, key="pay-1")
        assert first.status == again.status == 200
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json == first.json
        assert (await till.api.balance(till.world.user))["posted_minor"] == 10_000 - 2_800


async def test_expiry_and_payment_codes_on_the_clock_across_a_restart(dsn: str) -> None:
    job = EXPIRE_JOB
    clock = Clock()
    async with _serving(dsn, clock) as api:
        till = Till(api=api, world=await make_world(api), clock=clock)
        order = await till.precreate(timeout_express="1m")
        code = (await api.post("/v1/payment_codes", {"payer_account_id": till.world.user})).json
    clock.advance(minutes=1)
    async with _serving(dsn, clock) as api:  # a restart in the middle of both
        till.api = api
        assert await job.run_once(api.engine, now=clock.now, limit=10) == 1
        assert await job.run_once(api.engine, now=clock.now, limit=10) == 0
        expired = (await api.get(f"/v1/orders/{order['id']}")).json
        assert (expired["state"], expired["close_reason"]) == ("TRADE_CLOSED", "expired")
        problem = await till.refused(
            409, "order_state_conflict", "POST", "/v1/orders/pay", "/v1/orders/pay",
            {"qr_code": order["qr_code"], "payer_account_id": till.world.user},
        )  # fmt: skip
        assert problem["state"] == "TRADE_CLOSED"
        await till.refused(
            409, "payment_code_expired", "POST", "/v1/payment_codes/charge",
            "/v1/payment_codes/charge",
            {"code": code["code"], "merchant_account_id": till.world.merchant,
             "out_trade_no": "TILL_1", "subject": "x", "amount_minor": 1, "currency": "CNY"},
        )  # fmt: skip
