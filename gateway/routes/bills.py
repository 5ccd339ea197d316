"""/v1/billers and /v1/bills: register billers (an operator's action) and pay bills."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from engine.products import bills
from gateway.commands import read, run
from gateway.order_schemas import BillerCreate, BillPay, check_biller_create, check_currency
from gateway.routes._request import body_id, path_id, read_body

routes = web.RouteTableDef()


@routes.post("/v1/billers")
async def register(request: web.Request) -> web.Response:
    body = await read_body(request, BillerCreate)
    check_biller_create(body)
    new = bills.NewBiller(
        account_id=body_id(body.account_id, "$.account_id"),
        name=body.name,
        biller_type=body.biller_type,
        reference_pattern=body.reference_pattern,
        luhn=body.luhn,
    )
    return await run(
        request, bills.register(new), answer_type=bills.BillerView, operation="register_biller",
        body=body, render=bills.biller_json, status=201,
    )  # fmt: skip


@routes.get("/v1/billers/{biller_id}")
async def get_biller(request: web.Request) -> web.Response:
    biller_id = path_id(request, "biller_id", not_found="biller_not_found")
    return await read(
        request, bills.read_biller(biller_id), answer_type=bills.BillerView,
        render=bills.biller_json,
    )  # fmt: skip


@routes.post("/v1/bills/pay")
async def pay(request: web.Request) -> web.Response:
    body = await read_body(request, BillPay)
    check_currency(body.currency)
    payment = bills.BillPayment(
        biller_id=body_id(body.biller_id, "$.biller_id"),
        reference=body.reference,
        payer_account_id=body_id(body.payer_account_id, "$.payer_account_id"),
        amount_minor=body.amount_minor,
        currency=body.currency,
        notify_url=body.notify_url,
    )
    return await run(
        request, bills.pay(payment), answer_type=bills.ReceiptView, operation="pay_bill",
        body=body, render=bills.receipt_json, status=201,
    )  # fmt: skip


ROUTES: Final = list(routes)
