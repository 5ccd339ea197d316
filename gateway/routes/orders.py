"""/v1/orders: QR-code merchant payments (precreate, pay, query, close, refund) and the
QR images of an order's code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aiohttp import web

from engine import EngineError
from engine.products import order_refunds as refunds
from engine.products import orders, run_step
from engine.products.terms import OUT_NO_PATTERN
from gateway import qr
from gateway.commands import ENGINE, caller_scope, problem_error, read, run
from gateway.order_schemas import (
    OrderClose,
    OrderCreate,
    OrderPay,
    OrderRefundCreate,
    check_currency,
)
from gateway.problems import ProblemError, problem
from gateway.routes._request import body_id, path_id, read_body
from gateway.schemas import invalid

QR_CACHE_CONTROL: Final = "private, max-age=300"
routes = web.RouteTableDef()


def _order_id(request: web.Request) -> int:
    return path_id(request, "order_id", not_found="order_not_found")


@routes.post("/v1/orders")
async def precreate(request: web.Request) -> web.Response:
    body = await read_body(request, OrderCreate)
    check_currency(body.currency)
    timeout = orders.parse_timeout(body.timeout_express)
    if timeout is None:
        raise invalid("$.timeout_express", "timeout_express must be from 1m to 15d")
    new = orders.NewOrder(
        merchant_account_id=body_id(body.merchant_account_id, "$.merchant_account_id"),
        out_trade_no=body.out_trade_no,
        subject=body.subject,
        amount_minor=body.amount_minor,
        currency=body.currency,
        timeout=timeout,
        notify_url=body.notify_url,
    )
    return await run(
        request, orders.precreate(new), answer_type=orders.OrderView,
        operation="precreate_order", body=body, render=orders.order_json, status=201,
    )  # fmt: skip


@routes.post("/v1/orders/pay")
async def pay(request: web.Request) -> web.Response:
    body = await read_body(request, OrderPay)
    step = orders.pay(
        qr_code=body.qr_code,
        payer_account_id=body_id(body.payer_account_id, "$.payer_account_id"),
    )
    return await run(
        request, step, answer_type=orders.OrderView, operation="pay_order", body=body,
        render=orders.order_json, status=200,
    )  # fmt: skip


@routes.get("/v1/orders/{order_id}")
async def get_order(request: web.Request) -> web.Response:
    step = orders.read(_order_id(request))
    return await read(request, step, answer_type=orders.OrderView, render=orders.order_json)


@routes.get("/v1/merchants/{account_id}/orders/{out_trade_no}")
async def get_order_by_out_trade_no(request: web.Request) -> web.Response:
    """alipay.trade.query by the merchant's own number."""
    merchant = path_id(request, "account_id", not_found="order_not_found")
    out_trade_no = request.match_info["out_trade_no"]
    if not orders.OUT_TRADE_NO_RE.fullmatch(out_trade_no):
        raise ProblemError("order_not_found", detail=f"{OUT_NO_PATTERN} is the form of one")
    step = orders.read_by_out_trade_no(merchant_account_id=merchant, out_trade_no=out_trade_no)
    return await read(request, step, answer_type=orders.OrderView, render=orders.order_json)


@routes.post("/v1/orders/{order_id}/close")
async def close(request: web.Request) -> web.Response:
    order_id = _order_id(request)
    body = await read_body(request, OrderClose)
    return await run(
        request, orders.close(order_id), answer_type=orders.OrderView, operation="close_order",
        body=body, render=orders.order_json, status=200,
    )  # fmt: skip


@routes.post("/v1/orders/{order_id}/refunds")
async def refund(request: web.Request) -> web.Response:
    order_id = _order_id(request)
    body = await read_body(request, OrderRefundCreate)
    step = refunds.refund(
        order_id=order_id, out_request_no=body.out_request_no, amount_minor=body.amount_minor
    )
    return await run(
        request, step, answer_type=orders.RefundView, operation="refund_order", body=body,
        render=orders.refund_json, status=201,
    )  # fmt: skip


async def _image(
    request: web.Request, draw: Callable[[str], bytes], content_type: str
) -> web.Response:
    step = orders.read(_order_id(request))
    try:
        outcome = await run_step(
            request.app[ENGINE], step, answer_type=orders.OrderView,
            scope=caller_scope(request), idempotency=None,
        )  # fmt: skip
    except EngineError as error:
        raise problem_error(request, error) from None
    if outcome.refusal is not None:
        return problem(outcome.refusal.code, detail=outcome.refusal.detail)
    assert outcome.value is not None
    if outcome.value.qr_code is None:
        raise ProblemError("order_not_found", detail="a payment-code order has no QR code")
    return web.Response(
        body=draw(outcome.value.qr_code),
        content_type=content_type,
        headers={"Cache-Control": QR_CACHE_CONTROL},
    )


@routes.get("/v1/orders/{order_id}/qr.png")
async def qr_png(request: web.Request) -> web.Response:
    return await _image(request, qr.png, "image/png")


@routes.get("/v1/orders/{order_id}/qr.svg")
async def qr_svg(request: web.Request) -> web.Response:
    return await _image(request, qr.svg, "image/svg+xml")


ROUTES: Final = list(routes)
