"""/v1/payment_codes: a payer's short-lived payment code (付款码), and a till charging it."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from engine.products import orders, payment_codes
from gateway.commands import run
from gateway.order_schemas import (
    PaymentCodeCharge,
    PaymentCodeCreate,
    check_currency,
    payment_code_json,
)
from gateway.routes._request import body_id, read_body

routes = web.RouteTableDef()


@routes.post("/v1/payment_codes")
async def issue(request: web.Request) -> web.Response:
    body = await read_body(request, PaymentCodeCreate)
    step = payment_codes.issue(
        payer_account_id=body_id(body.payer_account_id, "$.payer_account_id")
    )
    return await run(
        request, step, answer_type=payment_codes.PaymentCodeView,
        operation="issue_payment_code", body=body, render=payment_code_json, status=201,
    )  # fmt: skip


@routes.post("/v1/payment_codes/charge")
async def charge(request: web.Request) -> web.Response:
    body = await read_body(request, PaymentCodeCharge)
    check_currency(body.currency)
    step = payment_codes.charge(
        payment_codes.Charge(
            code=body.code,
            merchant_account_id=body_id(body.merchant_account_id, "$.merchant_account_id"),
            out_trade_no=body.out_trade_no,
            subject=body.subject,
            amount_minor=body.amount_minor,
            currency=body.currency,
            notify_url=body.notify_url,
        )
    )
    return await run(
        request, step, answer_type=orders.OrderView, operation="charge_payment_code",
        body=body, render=orders.order_json, status=201,
    )  # fmt: skip


ROUTES: Final = list(routes)
