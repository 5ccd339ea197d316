"""The OpenAPI 3.1 document served at /openapi.json.

Request schemas come from the msgspec types the gateway decodes with, so they cannot
drift from what is accepted; response schemas are written here, and tests check real
responses against them and check that every route is documented and every documented
route exists.
"""

from __future__ import annotations

from typing import Any, Final, get_args

import msgspec

from engine.products.banks import SIGNATURE_HEADER, BankCallback
from engine.products.trades import CloseReason, ConfirmedBy, TradeState
from gateway.channel_schemas import ChannelName, TopupCreate, WithdrawalCreate
from gateway.order_schemas import REQUEST_TYPES as ORDER_REQUEST_TYPES
from gateway.problems import PROBLEM_TYPES
from gateway.schemas import (
    AccountCreate,
    StepUpConfirm,
    TransferCreate,
    TransferGroupCreate,
    TransferPost,
    TransferVoid,
)
from gateway.trade_schemas import TradeAction, TradeCreate, TradeRefundCreate
from gateway.webhook_schemas import WebhookRedeliver

_REQUEST_TYPES: Final = (
    AccountCreate,
    TransferCreate,
    TransferGroupCreate,
    TransferPost,
    TransferVoid,
    WebhookRedeliver,
    TopupCreate,
    WithdrawalCreate,
    BankCallback,
    TradeCreate,
    TradeAction,
    TradeRefundCreate,
    *ORDER_REQUEST_TYPES,
    StepUpConfirm,
)
_OPTIONAL_BODIES: Final = (
    "TransferPost",
    "TransferVoid",
    "WebhookRedeliver",
    "TradeAction",
    "OrderClose",
)

_ID: Final = {"type": "string", "pattern": r"^[1-9][0-9]{0,18}$"}
_NULLABLE_ID: Final = {"anyOf": [_ID, {"type": "null"}]}
_INT64: Final = {"type": "integer", "format": "int64"}
_TIME: Final = {"type": "string", "format": "date-time"}
_NULLABLE_TIME: Final = {"anyOf": [_TIME, {"type": "null"}]}
_METADATA: Final = {"type": "object", "additionalProperties": {"type": "string"}}


def _object(
    properties: dict[str, Any], *, optional: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {**properties, **(optional or {})},
        "required": sorted(properties),
    }


def _ref_schema(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_ORDER: Final = _object(
    {
        "object": {"const": "order"},
        "id": _ID,
        "merchant_account_id": _ID,
        "out_trade_no": {"type": "string", "pattern": r"^[A-Za-z0-9_]{1,64}$"},
        "subject": {"type": "string"},
        "amount_minor": _INT64,
        "currency": {"type": "string"},
        "source": {"enum": ["qr_code", "payment_code"]},
        "qr_code": _nullable({"type": "string", "description": "The payload to show as a QR"}),
        "state": {"enum": ["WAIT_BUYER_PAY", "TRADE_SUCCESS", "TRADE_CLOSED"]},
        "close_reason": {"enum": ["closed", "expired", "refunded", None]},
        "payer_account_id": _NULLABLE_ID,
        "transfer_id": _NULLABLE_ID,
        "fee_minor": _INT64,
        "refunded_minor": _INT64,
        "notify_url": _nullable({"type": "string"}),
        "expires_at": _TIME,
        "created_at": _TIME,
        "paid_at": _NULLABLE_TIME,
        "closed_at": _NULLABLE_TIME,
    }
)
_ORDER_SCHEMAS: Final[dict[str, Any]] = {
    "Order": _ORDER,
    "OrderRefund": _object(
        {
            "object": {"const": "order_refund"},
            "id": _ID,
            "order_id": _ID,
            "out_request_no": {"type": "string"},
            "amount_minor": _INT64,
            "transfer_id": _ID,
            "created_at": _TIME,
            "order": {"$ref": "#/components/schemas/Order"},
        }
    ),
    "PaymentCode": _object(
        {
            "object": {"const": "payment_code"},
            "code": {"type": "string", "pattern": "^[0-9]{18}$"},
            "payer_account_id": _ID,
            "expires_at": _TIME,
            "created_at": _TIME,
        }
    ),
    "Biller": _object(
        {
            "object": {"const": "biller"},
            "id": _ID,
            "account_id": _ID,
            "name": {"type": "string"},
            "biller_type": {"enum": ["utility", "mobile_topup", "credit_card"]},
            "reference_pattern": {"type": "string"},
            "luhn": {"type": "boolean"},
            "created_at": _TIME,
        }
    ),
    "BillReceipt": _object(
        {
            "object": {"const": "bill_receipt"},
            "id": _ID,
            "receipt_no": {"type": "string"},
            "biller_id": _ID,
            "biller_name": {"type": "string"},
            "biller_type": {"enum": ["utility", "mobile_topup", "credit_card"]},
            "reference_masked": {"type": "string"},
            "payer_account_id": _ID,
            "amount_minor": _INT64,
            "fee_minor": _INT64,
            "currency": {"type": "string"},
            "transfer_id": _ID,
            "paid_at": _TIME,
        }
    ),
}


_RESPONSE_SCHEMAS: Final[dict[str, Any]] = {
    "Account": _object(
        {
            "object": {"const": "account"},
            "id": _ID,
            "currency": {"type": "string"},
            "kind": {"enum": ["user", "merchant", "system"]},
            "overdraft_allowed": {"type": "boolean"},
            "balance": _object(
                {"posted_minor": _INT64, "pending_minor": _INT64, "available_minor": _INT64}
            ),
            "debits_posted_minor": _INT64,
            "credits_posted_minor": _INT64,
            "debits_pending_minor": _INT64,
            "credits_pending_minor": _INT64,
            "metadata": _METADATA,
            "created_at": _TIME,
        }
    ),
    "Transfer": _object(
        {
            "object": {"const": "transfer"},
            "id": _ID,
            "debit_account_id": _ID,
            "credit_account_id": _ID,
            "currency": {"type": "string"},
            "amount_minor": _INT64,
            "posted_amount_minor": _INT64,
            "status": {"enum": ["pending", "posted", "voided", "expired"]},
            "pending": {"type": "boolean"},
            "group_id": _NULLABLE_ID,
            "metadata": _METADATA,
            "expires_at": _NULLABLE_TIME,
            "created_at": _TIME,
            "resolved_at": _NULLABLE_TIME,
        }
    ),
    "TransferGroup": _object(
        {
            "object": {"const": "transfer_group"},
            "id": _NULLABLE_ID,
            "transfers": {"type": "array", "items": {"$ref": "#/components/schemas/Transfer"}},
        }
    ),
    "Entry": _object(
        {
            "object": {"const": "entry"},
            "id": _ID,
            "account_id": _ID,
            "transfer_id": _ID,
            "kind": {"enum": ["transfer", "hold", "post", "void", "expire"]},
            "posted_delta_minor": _INT64,
            "pending_delta_minor": _INT64,
            "posted_after_minor": _INT64,
            "pending_after_minor": _INT64,
            "created_at": _TIME,
        }
    ),
    "EntryList": _object(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}},
            "has_more": {"type": "boolean"},
        }
    ),
    "WebhookDelivery": _object(
        {
            "object": {"const": "webhook_delivery"},
            "id": _ID,
            "event_id": _ID,
            "event_type": {"type": "string"},
            "subject_id": _ID,
            "url": {"type": "string"},
            "status": {"enum": ["pending", "delivered", "dead"]},
            "attempts": {"type": "integer", "minimum": 0},
            "next_attempt_at": _NULLABLE_TIME,
            "last_attempt_at": _NULLABLE_TIME,
            "last_status_code": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "last_error": {"anyOf": [{"type": "string", "maxLength": 300}, {"type": "null"}]},
            "created_at": _TIME,
            "delivered_at": _NULLABLE_TIME,
        }
    ),
    "WebhookDeliveryList": _object(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/WebhookDelivery"}},
            "has_more": {"type": "boolean"},
        }
    ),
    **{
        name: _object(
            {
                "object": {"const": kind},
                "id": _ID,
                "channel": {"enum": list(get_args(ChannelName))},
                "account_id": _ID,
                "amount_minor": _INT64,
                "currency": {"type": "string"},
                "state": {"enum": ["pending", "succeeded", "failed", "timed_out"]},
                "hold_id": _ID,
                "destination": {
                    "anyOf": [{"type": "string"}, {"type": "null"}],
                    "description": "Withdrawals: the destination, all but its end masked",
                },
                "bank_reference": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "failure_reason": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "metadata": _METADATA,
                "expires_at": {
                    **_TIME,
                    "description": "No answer from the bank by then: "
                    "the request times out and its hold is voided",
                },
                "created_at": _TIME,
                "resolved_at": _NULLABLE_TIME,
                "instructions": {
                    "anyOf": [{"type": "object"}, {"type": "null"}],
                    "description": "What the payer does to finish a top-up: a redirect "
                    "(ebank), a remittance number (postal), a payment slip (cash)",
                },
            }
        )
        for name, kind in (("Topup", "topup"), ("Withdrawal", "withdrawal"))
    },
    "ChannelCallback": _object(
        {
            "object": {"const": "channel_callback"},
            "outcome": {"enum": ["applied", "duplicate"]},
            "request": {"anyOf": [_ref_schema("Topup"), _ref_schema("Withdrawal")]},
        }
    ),
    "Trade": _object(
        {
            "object": {"const": "trade"},
            "id": _ID,
            "out_trade_no": {"type": "string"},
            "seller_account_id": _ID,
            "buyer_account_id": _ID,
            "currency": {"type": "string"},
            "amount_minor": _INT64,
            "subject": {"type": "string"},
            "state": {"enum": [s.value for s in TradeState]},
            "timeout_express": {"type": "string"},
            "confirm_timeout_express": {"type": "string"},
            "refund_window_express": {"type": "string"},
            "notify_url": {"type": ["string", "null"]},
            "hold_transfer_id": _NULLABLE_ID,
            "held_minor": _INT64,
            "settled_minor": _INT64,
            "refunded_minor": _INT64,
            "refundable_minor": _INT64,
            "fee_minor": _INT64,
            "fee_refunded_minor": _INT64,
            "confirmed_by": {"enum": [*(c.value for c in ConfirmedBy), None]},
            "close_reason": {"enum": [*(c.value for c in CloseReason), None]},
            "created_at": _TIME,
            "pay_expires_at": _TIME,
            "paid_at": _NULLABLE_TIME,
            "shipped_at": _NULLABLE_TIME,
            "confirm_expires_at": _NULLABLE_TIME,
            "succeeded_at": _NULLABLE_TIME,
            "finish_at": _NULLABLE_TIME,
            "finished_at": _NULLABLE_TIME,
            "closed_at": _NULLABLE_TIME,
        }
    ),
    "TradeRefund": _object(
        {
            "object": {"const": "trade_refund"},
            "id": _ID,
            "trade_id": _ID,
            "out_request_no": {"type": "string"},
            "amount_minor": _INT64,
            "fee_refunded_minor": _INT64,
            "after_settlement": {"type": "boolean"},
            "transfer_id": _ID,
            "reason": {"type": "string"},
            "created_at": _TIME,
        },
        # A refund just made also shows its trade; the list of refunds does not.
        optional={"trade": {"$ref": "#/components/schemas/Trade"}},
    ),
    "TradeRefundList": _object(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/TradeRefund"}},
            "has_more": {"type": "boolean"},
        }
    ),
    **_ORDER_SCHEMAS,
    "StepUp": {
        **_object(
            {
                "object": {"const": "step_up"},
                "id": _ID,
                "status": {"const": "pending"},
                "account_id": _ID,
                "expires_at": _TIME,
                "attempts_max": {"type": "integer"},
                "confirm_url": {"type": "string"},
            }
        ),
        "description": "The transfer is above the payer's step-up threshold: nothing moved. "
        "A one-time code was sent to the payer; POST it to confirm_url to run the transfer.",
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "code": {"enum": sorted(PROBLEM_TYPES)},
            "failed_index": {"type": "integer"},
            "state": {
                "type": "string",
                "description": "The trade's or order's state, on a conflict",
            },
            "refundable_minor": _INT64,
            "expires_at": _TIME,
            "out_trade_no": {"type": "string"},
            "out_request_no": {"type": "string"},
            "biller_type": {"type": "string"},
            "retry_after_s": {
                "type": "integer",
                "description": "Risk limits: seconds until a new request (new key) may pass",
            },
            "attempts_left": {
                "type": "integer",
                "description": "A wrong step-up code: tries left before the step-up dies",
            },
            "errors": {"type": "array", "items": {"type": "object"}},
            "trade_id": _ID,
            "refund_id": _ID,
            "field": {"type": "string"},
        },
        "required": ["type", "title", "status", "code"],
    },
}

_IDEMPOTENCY_KEY: Final = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "Unique per operation; a retry with the same key returns the first answer",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_STEP_UP_ACCEPTED: Final = {
    "description": "Waiting for the payer's one-time code; nothing moved yet",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/StepUp"}}},
}

_PROBLEM: Final = {
    "description": "A problem (RFC 9457)",
    "content": {"application/problem+json": {"schema": _ref("Problem")}},
}


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


def _command(summary: str, request: str, response: str, status: int, **extra: Any) -> Any:
    return {
        "summary": summary,
        "parameters": [_IDEMPOTENCY_KEY, *extra.get("parameters", [])],
        "requestBody": {
            "required": request not in _OPTIONAL_BODIES,
            "content": {"application/json": {"schema": _ref(request)}},
        },
        "responses": {
            str(status): _json(response, summary),
            **({"202": extra["accepted"]} if "accepted" in extra else {}),
            "default": _PROBLEM,
        },
    }


def _read(summary: str, response: str, parameters: list[Any]) -> Any:
    return {
        "summary": summary,
        "parameters": parameters,
        "responses": {"200": _json(response, summary), "default": _PROBLEM},
    }


def _plain(summary: str, content_type: str) -> Any:
    return {
        "summary": summary,
        "responses": {
            "200": {"description": summary, "content": {content_type: {"schema": {}}}},
            "default": _PROBLEM,
        },
    }


def _image(summary: str, content_type: str) -> Any:
    return {
        "summary": summary,
        "parameters": [_path_id("order_id")],
        "responses": {
            "200": {
                "description": summary,
                "content": {content_type: {"schema": {"type": "string", "format": "binary"}}},
            },
            "default": _PROBLEM,
        },
    }


_ORDER_ID: Final = [_path_id("order_id")]
_ORDER_PATHS: Final[dict[str, dict[str, Any]]] = {
    "/v1/orders": {
        "post": _command(
            "Precreate a QR order (alipay.trade.precreate)", "OrderCreate", "Order", 201
        )
    },
    "/v1/orders/pay": {
        "post": _command("Pay an order by its scanned QR code", "OrderPay", "Order", 200)
    },
    "/v1/orders/{order_id}": {"get": _read("Query an order", "Order", _ORDER_ID)},
    "/v1/merchants/{account_id}/orders/{out_trade_no}": {
        "get": _read(
            "Query an order by the merchant's out_trade_no (alipay.trade.query)",
            "Order",
            [
                _path_id("account_id"),
                {
                    "name": "out_trade_no",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_]{1,64}$"},
                },
            ],
        )
    },
    "/v1/orders/{order_id}/close": {
        "post": _command("Close an unpaid order", "OrderClose", "Order", 200, parameters=_ORDER_ID)
    },
    "/v1/orders/{order_id}/refunds": {
        "post": _command(
            "Refund a paid order, in full or in part, keyed by out_request_no",
            "OrderRefundCreate",
            "OrderRefund",
            201,
            parameters=_ORDER_ID,
        )
    },
    "/v1/orders/{order_id}/qr.png": {"get": _image("The order's QR code as PNG", "image/png")},
    "/v1/orders/{order_id}/qr.svg": {"get": _image("The order's QR code as SVG", "image/svg+xml")},
    "/v1/payment_codes": {
        "post": _command(
            "Issue a payer's payment code (single use, 60 s)",
            "PaymentCodeCreate",
            "PaymentCode",
            201,
        )
    },
    "/v1/payment_codes/charge": {
        "post": _command(
            "Charge a payment code at a till: a paid order", "PaymentCodeCharge", "Order", 201
        )
    },
    "/v1/billers": {
        "post": _command("Register a biller (operator)", "BillerCreate", "Biller", 201)
    },
    "/v1/billers/{biller_id}": {"get": _read("Read a biller", "Biller", [_path_id("biller_id")])},
    "/v1/bills/pay": {"post": _command("Pay a bill", "BillPay", "BillReceipt", 201)},
}

_PAGE_PARAMETERS: Final = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "starting_after", "in": "query", "schema": _ID},
]

PATHS: Final[dict[str, dict[str, Any]]] = {
    "/v1/accounts": {"post": _command("Open an account", "AccountCreate", "Account", 201)},
    "/v1/accounts/{account_id}": {
        "get": _read("Read an account and its balance", "Account", [_path_id("account_id")])
    },
    "/v1/accounts/{account_id}/entries": {
        "get": _read(
            "List an account's entries, newest first",
            "EntryList",
            [_path_id("account_id"), *_PAGE_PARAMETERS],
        )
    },
    "/v1/transfers": {
        "post": _command(
            "Move money, or hold it (pending)",
            "TransferCreate",
            "Transfer",
            201,
            accepted=_STEP_UP_ACCEPTED,
        )
    },
    "/v1/transfers/{transfer_id}": {
        "get": _read("Read a transfer", "Transfer", [_path_id("transfer_id")])
    },
    "/v1/transfers/{transfer_id}/post": {
        "post": _command(
            "Post a hold, in full or in part",
            "TransferPost",
            "Transfer",
            200,
            parameters=[_path_id("transfer_id")],
        )
    },
    "/v1/transfers/{transfer_id}/void": {
        "post": _command(
            "Void a hold", "TransferVoid", "Transfer", 200, parameters=[_path_id("transfer_id")]
        )
    },
    "/v1/transfer_groups": {
        "post": _command(
            "Linked transfers: all succeed or none",
            "TransferGroupCreate",
            "TransferGroup",
            201,
            accepted=_STEP_UP_ACCEPTED,
        )
    },
    "/v1/accounts/{account_id}/statements/{date}": {
        "get": {
            "summary": "A day's statement (UTC): every posted movement, as CSV",
            "parameters": [
                _path_id("account_id"),
                {
                    "name": "date",
                    "in": "path",
                    "required": True,
                    "description": "The UTC day, YYYY-MM-DD, optionally with .csv",
                    "schema": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}(\.csv)?$"},
                },
            ],
            "responses": {
                "200": {
                    "description": "RFC 4180 CSV with a header line; amounts in minor units",
                    "content": {"text/csv": {"schema": {"type": "string"}}},
                },
                "default": _PROBLEM,
            },
        }
    },
    "/v1/topups": {
        "post": _command("Top up a wallet through a bank channel", "TopupCreate", "Topup", 201)
    },
    "/v1/topups/{topup_id}": {"get": _read("Read a top-up", "Topup", [_path_id("topup_id")])},
    "/v1/withdrawals": {
        "post": _command(
            "Withdraw to a bank through a channel (held until the bank pays)",
            "WithdrawalCreate",
            "Withdrawal",
            201,
        )
    },
    "/v1/withdrawals/{withdrawal_id}": {
        "get": _read("Read a withdrawal", "Withdrawal", [_path_id("withdrawal_id")])
    },
    "/v1/channels/{channel}/callbacks": {
        "post": {
            "summary": "A bank reports how a top-up or withdrawal ended (signed)",
            "description": "Called by banks, not partners. Idempotent by the request's "
            "state: the first authentic callback posts or voids the hold; a repeat is "
            "answered 200 with outcome duplicate and changes nothing.",
            "parameters": [
                {
                    "name": "channel",
                    "in": "path",
                    "required": True,
                    "schema": {"enum": list(get_args(ChannelName))},
                },
                {
                    "name": SIGNATURE_HEADER,
                    "in": "header",
                    "required": True,
                    "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of 't.body' with "
                    "the channel's secret>; refused when more than 300 s old",
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("BankCallback")}},
            },
            "responses": {
                "200": _json("ChannelCallback", "The callback was applied, or was a repeat"),
                "default": _PROBLEM,
            },
        }
    },
    "/v1/step-ups/{step_up_id}/confirm": {
        "post": {
            **_command(
                "Confirm a step-up with the payer's code: the transfer (or group) runs once",
                "StepUpConfirm",
                "Transfer",
                201,
                parameters=[_path_id("step_up_id")],
            ),
            "responses": {
                "201": {
                    "description": "The transfer, or the linked group, that the step-up held",
                    "content": {
                        "application/json": {
                            "schema": {"oneOf": [_ref("Transfer"), _ref("TransferGroup")]}
                        }
                    },
                },
                "default": _PROBLEM,
            },
        }
    },
    "/v1/webhook_deliveries": {
        "get": _read(
            "List the caller's webhook deliveries, newest first",
            "WebhookDeliveryList",
            [
                {
                    "name": "status",
                    "in": "query",
                    "schema": {"enum": ["pending", "delivered", "dead"]},
                },
                *_PAGE_PARAMETERS,
            ],
        )
    },
    "/v1/webhook_deliveries/{delivery_id}/redeliver": {
        "post": _command(
            "Send a webhook event again now",
            "WebhookRedeliver",
            "WebhookDelivery",
            200,
            parameters=[_path_id("delivery_id")],
        )
    },
    "/v1/trades": {
        "post": _command("Open an escrow trade (the seller)", "TradeCreate", "Trade", 201),
        "get": _read(
            "Find a trade by the seller's out_trade_no (like alipay.trade.query)",
            "Trade",
            [
                {
                    "name": "out_trade_no",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_]{1,64}$"},
                },
                {"name": "seller_account_id", "in": "query", "required": True, "schema": _ID},
            ],
        ),
    },
    "/v1/trades/{trade_id}": {"get": _read("Read a trade", "Trade", [_path_id("trade_id")])},
    **{
        f"/v1/trades/{{trade_id}}/{action}": {
            "post": _command(
                summary, "TradeAction", "Trade", 200, parameters=[_path_id("trade_id")]
            )
        }
        for action, summary in (
            ("pay", "Pay a trade (the buyer): the money is held for the seller"),
            ("ship", "Mark a paid trade shipped (the seller): the auto-confirm clock starts"),
            ("confirm", "Confirm receipt (the buyer): settle to the seller less the fee"),
            ("close", "Close an unpaid trade (the seller)"),
        )
    },
    "/v1/trades/{trade_id}/refunds": {
        "post": _command(
            "Refund a trade in full or in part, keyed by out_request_no",
            "TradeRefundCreate",
            "TradeRefund",
            201,
            parameters=[_path_id("trade_id")],
        ),
        "get": _read("List a trade's refunds", "TradeRefundList", [_path_id("trade_id")]),
    },
    **_ORDER_PATHS,
    "/healthz": {"get": _plain("The process is alive", "application/json")},
    "/readyz": {"get": _plain("The database answers: ready for traffic", "application/json")},
    "/metrics": {"get": _plain("Prometheus metrics", "text/plain")},
    "/openapi.json": {"get": _plain("This document", "application/json")},
    "/problems/{code}": {
        "get": {
            "summary": "Describe a problem type",
            "parameters": [
                {"name": "code", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {"200": _plain("", "text/plain")["responses"]["200"], "default": _PROBLEM},
        }
    },
}


def document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        _REQUEST_TYPES, ref_template="#/components/schemas/{name}"
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "txengine",
            "version": "1",
            "description": "A double-entry transaction engine. Amounts are integers in "
            "minor units; ids are decimal strings.",
        },
        "paths": PATHS,
        "components": {"schemas": {**components, **_RESPONSE_SCHEMAS}},
    }
