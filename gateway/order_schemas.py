"""Request and response types of the merchant-payment routes: QR orders and their
refunds, payment codes, billers and bill payments (kept apart from gateway/schemas.py,
which holds the ledger's)."""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from engine.model import is_known_currency
from engine.products.bills import (
    PATTERN_LENGTH_MAX,
    REFERENCE_LENGTH_MAX,
    BillerType,
    pattern_error,
)
from engine.products.orders import QR_CODE_PATTERN, TIMEOUT_DEFAULT
from engine.products.payment_codes import CODE_LENGTH, PaymentCodeView
from gateway.schemas import (
    AmountMinor,
    Currency,
    IdText,
    NotifyUrl,
    OutNo,
    Subject,
    free_text,
    invalid,
)

TimeoutExpress = Annotated[
    str,
    Meta(
        pattern=r"^[1-9][0-9]{0,5}[mhd]$",
        description="Time to pay, from 1m to 15d (minutes, hours, days), like Alipay's",
    ),
]


class OrderCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    merchant_account_id: IdText
    out_trade_no: OutNo
    subject: Subject
    amount_minor: AmountMinor
    currency: Currency
    timeout_express: TimeoutExpress = TIMEOUT_DEFAULT
    notify_url: NotifyUrl | None = None


class OrderPay(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    qr_code: Annotated[
        str,
        Meta(pattern=QR_CODE_PATTERN, description="As scanned: the payload, or its bare code"),
    ]
    payer_account_id: IdText


class OrderClose(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class OrderRefundCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    out_request_no: OutNo
    amount_minor: AmountMinor


class PaymentCodeCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    payer_account_id: IdText


class PaymentCodeCharge(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    code: Annotated[str, Meta(pattern=rf"^[0-9]{{{CODE_LENGTH}}}$")]
    merchant_account_id: IdText
    out_trade_no: OutNo
    subject: Subject
    amount_minor: AmountMinor
    currency: Currency
    notify_url: NotifyUrl | None = None


class BillerCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    account_id: IdText
    name: Annotated[str, free_text(max_length=128)]
    biller_type: BillerType
    reference_pattern: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=PATTERN_LENGTH_MAX,
                description="A regular expression the whole reference must match; "
                "omitted: the biller type's default",
            ),
        ]
        | None
    ) = None
    luhn: bool | None = None  # the reference ends in a Luhn check digit; omitted: by type


class BillPay(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    biller_id: IdText
    reference: Annotated[str, free_text(max_length=REFERENCE_LENGTH_MAX)]
    payer_account_id: IdText
    amount_minor: AmountMinor
    currency: Currency
    notify_url: NotifyUrl | None = None


REQUEST_TYPES: Final = (
    OrderCreate,
    OrderPay,
    OrderClose,
    OrderRefundCreate,
    PaymentCodeCreate,
    PaymentCodeCharge,
    BillerCreate,
    BillPay,
)


def check_currency(currency: str) -> None:
    if not is_known_currency(currency):
        raise invalid("$.currency", f"unknown currency {currency!r}")


def check_biller_create(body: BillerCreate) -> None:
    if body.reference_pattern is not None:
        error = pattern_error(body.reference_pattern)
        if error is not None:
            raise invalid("$.reference_pattern", error)


# -- responses ---------------------------------------------------------------------------


def payment_code_json(code: PaymentCodeView) -> dict[str, Any]:
    return {
        "object": "payment_code",
        "code": code.code,
        "payer_account_id": str(code.payer_account_id),
        "expires_at": code.expires_at,
        "created_at": code.created_at,
    }
