"""Request types of /v1/trades, and their checks beyond what the types can say.

The terms and limits are the engine's (engine.products.trades, trade_refunds); this module
only turns a decoded body into the engine's value or a validation problem.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from engine.products.terms import EXPRESS_PATTERN
from engine.products.trade_refunds import (
    REASON_LENGTH_MAX,
    RefundRequest,
    refund_request_error,
)
from engine.products.trades import (
    CONFIRM_TIMEOUT_EXPRESS,
    REFUND_WINDOW_EXPRESS,
    TIMEOUT_EXPRESS,
    NewTrade,
    new_trade_error,
)
from gateway.problems import ProblemError
from gateway.schemas import (
    AmountMinor,
    Currency,
    IdText,
    NotifyUrl,
    OutNo,
    Subject,
    free_text,
    invalid,
    parse_id,
)


def _express(terms: tuple[str, str, str], what: str) -> Meta:
    default, least, most = terms
    return Meta(
        pattern=EXPRESS_PATTERN,
        description=f"{what}: minutes, hours or days (90m, 2h, 15d), {least} to {most}; "
        f"default {default}",
    )


TimeoutExpress = Annotated[str, _express(TIMEOUT_EXPRESS, "Time to pay before the trade closes")]
ConfirmExpress = Annotated[
    str, _express(CONFIRM_TIMEOUT_EXPRESS, "Time after shipping before the trade confirms itself")
]
RefundWindowExpress = Annotated[
    str, _express(REFUND_WINDOW_EXPRESS, "Time after success during which refunds are taken")
]


class TradeCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    out_trade_no: OutNo
    seller_account_id: IdText
    buyer_account_id: IdText
    amount_minor: AmountMinor
    currency: Currency
    subject: Subject
    timeout_express: TimeoutExpress = TIMEOUT_EXPRESS[0]
    confirm_timeout_express: ConfirmExpress = CONFIRM_TIMEOUT_EXPRESS[0]
    refund_window_express: RefundWindowExpress = REFUND_WINDOW_EXPRESS[0]
    notify_url: NotifyUrl | None = None


class TradeAction(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of pay, ship, confirm and close: nothing (an empty object or none)."""


class TradeRefundCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    out_request_no: OutNo
    amount_minor: AmountMinor
    reason: Annotated[str, free_text(min_length=0, max_length=REASON_LENGTH_MAX)] = ""


def _id(text: str, field: str) -> int:
    value = parse_id(text)
    if value is None:
        raise invalid(f"$.{field}", f"{text!r} is not a valid id")
    return value


def new_trade(body: TradeCreate) -> NewTrade:
    new = NewTrade(
        out_trade_no=body.out_trade_no,
        seller_account_id=_id(body.seller_account_id, "seller_account_id"),
        buyer_account_id=_id(body.buyer_account_id, "buyer_account_id"),
        amount_minor=body.amount_minor,
        currency=body.currency,
        subject=body.subject,
        timeout_express=body.timeout_express,
        confirm_timeout_express=body.confirm_timeout_express,
        refund_window_express=body.refund_window_express,
        notify_url=body.notify_url,
    )
    error = new_trade_error(new)
    if error is not None:
        field, message = error
        raise invalid(f"$.{field}", message)
    return new


def refund_request(body: TradeRefundCreate) -> RefundRequest:
    request = RefundRequest(
        out_request_no=body.out_request_no, amount_minor=body.amount_minor, reason=body.reason
    )
    error = refund_request_error(request)
    if error is not None:
        field, message = error
        raise invalid(f"$.{field}", message)
    return request


def query_text(value: str | None, name: str) -> str:
    if value is None:
        raise ProblemError(
            "validation_error",
            detail=f"the query needs {name}",
            errors=[{"path": name, "message": "required"}],
        )
    return value
