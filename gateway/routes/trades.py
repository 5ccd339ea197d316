"""/v1/trades: escrow trades (担保交易) and their refunds.

The seller creates a trade; the buyer pays (the money is held), the seller ships, the
buyer confirms (the money goes to the seller less the fee). Every POST is a product step
under its Idempotency-Key; an illegal step answers 409 `trade_state_conflict` with the
trade's current `state` and changes nothing. Until partner authentication exists, any
caller of the scope may act as buyer or seller.
"""

from __future__ import annotations

import re
from typing import Any, Final

from aiohttp import web

from engine.products import trade_refunds, trades
from engine.products.terms import OUT_NO_PATTERN
from engine.products.trade_refunds import RefundAnswer
from engine.products.trades import TradeView, trade_json
from gateway.commands import ENGINE, caller_scope, run
from gateway.problems import ProblemError
from gateway.routes._request import path_id, read_body
from gateway.schemas import encode, invalid, parse_id
from gateway.trade_schemas import (
    TradeAction,
    TradeCreate,
    TradeRefundCreate,
    new_trade,
    query_text,
    refund_request,
)

routes = web.RouteTableDef()
_OUT_NO_RE: Final = re.compile(OUT_NO_PATTERN)


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=encode(body), content_type="application/json")


def _trade_id(request: web.Request) -> int:
    return path_id(request, "trade_id", not_found="trade_not_found")


@routes.post("/v1/trades")
async def create_trade(request: web.Request) -> web.Response:
    body = await read_body(request, TradeCreate)
    step = trades.create(new_trade(body))
    return await run(
        request,
        step,
        answer_type=TradeView,
        operation="create_trade",
        body=body,
        render=trade_json,
        status=201,
    )


@routes.get("/v1/trades")
async def query_trade(request: web.Request) -> web.Response:
    """One trade by the seller's own number, like alipay.trade.query."""
    out_trade_no = query_text(request.query.get("out_trade_no"), "out_trade_no")
    seller_text = query_text(request.query.get("seller_account_id"), "seller_account_id")
    seller = parse_id(seller_text)
    if seller is None:
        raise invalid("seller_account_id", f"{seller_text!r} is not a valid id")
    if not _OUT_NO_RE.fullmatch(out_trade_no):
        raise invalid("out_trade_no", "1 to 64 letters, digits or underscores")
    trade = await trades.find_trade(
        request.app[ENGINE],
        scope=caller_scope(request),
        seller_account_id=seller,
        out_trade_no=out_trade_no,
    )
    if trade is None:
        raise ProblemError("trade_not_found", detail=f"no trade {out_trade_no!r} of that seller")
    return _json(trade_json(trade))


@routes.get("/v1/trades/{trade_id}")
async def get_trade(request: web.Request) -> web.Response:
    trade_id = _trade_id(request)
    trade = await trades.read_trade(request.app[ENGINE], trade_id, scope=caller_scope(request))
    if trade is None:
        raise ProblemError("trade_not_found", detail=f"no trade {trade_id}")
    return _json(trade_json(trade))


def _action(name: str, transition: Any) -> Any:
    async def handler(request: web.Request) -> web.Response:
        trade_id = _trade_id(request)
        body = await read_body(request, TradeAction)
        return await run(
            request,
            transition(trade_id),
            answer_type=TradeView,
            operation=f"{name}_trade",
            body=body,
            render=trade_json,
            status=200,
        )

    handler.__name__ = f"{name}_trade"
    return handler


for _name, _transition in (
    ("pay", trades.pay),
    ("ship", trades.ship),
    ("confirm", trades.confirm),
    ("close", trades.close),
):
    routes.post(f"/v1/trades/{{trade_id}}/{_name}")(_action(_name, _transition))


def _render_refund(answer: RefundAnswer) -> dict[str, Any]:
    return trade_refunds.refund_json(answer.refund, trade=answer.trade)


@routes.post("/v1/trades/{trade_id}/refunds")
async def create_refund(request: web.Request) -> web.Response:
    trade_id = _trade_id(request)
    body = await read_body(request, TradeRefundCreate)
    step = trade_refunds.refund(trade_id, refund_request(body))
    return await run(
        request,
        step,
        answer_type=RefundAnswer,
        operation="refund_trade",
        body=body,
        render=_render_refund,
        status=201,
    )


@routes.get("/v1/trades/{trade_id}/refunds")
async def list_refunds(request: web.Request) -> web.Response:
    trade_id = _trade_id(request)
    engine, scope = request.app[ENGINE], caller_scope(request)
    if await trades.read_trade(engine, trade_id, scope=scope) is None:
        raise ProblemError("trade_not_found", detail=f"no trade {trade_id}")
    refunds = await trade_refunds.list_refunds(engine, trade_id, scope=scope)
    return _json(
        {
            "object": "list",
            "data": [trade_refunds.refund_json(r) for r in refunds],
            "has_more": False,  # a trade takes at most REFUNDS_PER_TRADE_MAX refunds
        }
    )


ROUTES: Final = list(routes)
