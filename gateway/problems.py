"""RFC 9457 problem details: every error txengine answers, with a stable `type`.

A problem's `type` is a relative URI, `/problems/<code>`, which this server also serves
as a short description, so a partner can look any error up. `code` repeats the last
segment as an extension member for clients that would rather switch on a plain string.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import msgspec
from aiohttp import web

from engine import ResultCode

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
_ENCODER: Final = msgspec.json.Encoder()


@dataclasses.dataclass(frozen=True, slots=True)
class ProblemType:
    code: str
    status: int
    title: str


def _types(*types: ProblemType) -> dict[str, ProblemType]:
    by_code = {t.code: t for t in types}
    assert len(by_code) == len(types), "each problem code is defined once"
    return by_code


PROBLEM_TYPES: Final = _types(
    # The request itself is wrong: fix it before sending it again.
    ProblemType("validation_error", 400, "The request body or parameters are not valid"),
    ProblemType("invalid_json", 400, "The request body is not valid JSON"),
    ProblemType("invalid_cursor", 400, "The pagination cursor was not issued for this list"),
    ProblemType("idempotency_key_missing", 400, "This operation needs an Idempotency-Key"),
    ProblemType("idempotency_key_invalid", 400, "The Idempotency-Key header is malformed"),
    ProblemType("not_found", 404, "No such resource"),
    ProblemType("method_not_allowed", 405, "This method is not allowed on this resource"),
    ProblemType("body_too_large", 413, "The request body is larger than allowed"),
    ProblemType("not_acceptable", 406, "This resource cannot be served in the accepted type"),
    ProblemType("unsupported_media_type", 415, "Send the body as application/json"),
    ProblemType("request_timeout", 408, "The request did not arrive in time"),
    # Not authenticated (gateway/auth.py): each names the check that failed.
    ProblemType("missing_signature", 401, "The request is not signed"),
    ProblemType("malformed_signature", 401, "A signature header is malformed"),
    ProblemType("unknown_partner", 401, "No such partner"),
    ProblemType("partner_disabled", 401, "The partner is disabled"),
    ProblemType("stale_timestamp", 401, "The request's timestamp is too far from now"),
    ProblemType("bad_signature", 401, "The signature does not match the request"),
    ProblemType("replayed_nonce", 401, "The nonce was used before"),
    ProblemType("rate_limited", 429, "Too many requests from this partner; retry later"),
    # The ledger said no: the request was valid, the money did not move.
    ProblemType(ResultCode.ACCOUNT_NOT_FOUND, 404, "No such account"),
    ProblemType(ResultCode.TRANSFER_NOT_FOUND, 404, "No such transfer"),
    ProblemType("webhook_delivery_not_found", 404, "No such webhook delivery"),
    ProblemType(ResultCode.ACCOUNTS_MUST_DIFFER, 422, "Debit and credit accounts are the same"),
    ProblemType(ResultCode.CURRENCY_MISMATCH, 422, "The accounts and transfer currencies differ"),
    ProblemType(ResultCode.INSUFFICIENT_FUNDS, 422, "The debit account has too little money"),
    ProblemType(ResultCode.OVERFLOW, 422, "An account's totals would exceed their limit"),
    ProblemType(ResultCode.LINKED_TRANSFER_FAILED, 422, "Another transfer of the group failed"),
    ProblemType(ResultCode.TRANSFER_NOT_PENDING, 409, "The transfer is not a pending hold"),
    ProblemType(ResultCode.TRANSFER_ALREADY_RESOLVED, 409, "The hold was posted or voided"),
    ProblemType(ResultCode.PENDING_TRANSFER_EXPIRED, 409, "The hold's timeout has passed"),
    ProblemType(
        ResultCode.TRANSFER_HELD_BY_PRODUCT, 409, "The hold belongs to a product such as a trade"
    ),
    ProblemType(
        ResultCode.POST_AMOUNT_EXCEEDS_PENDING, 422, "Cannot post more than the hold holds"
    ),
    ProblemType(
        ResultCode.IDEMPOTENCY_KEY_REUSED, 422, "The key was used before with another request"
    ),
    # Bank channels: top-ups, withdrawals and the banks' callbacks.
    ProblemType("channel_not_found", 404, "No such bank channel"),
    ProblemType("topup_not_found", 404, "No such top-up"),
    ProblemType("withdrawal_not_found", 404, "No such withdrawal"),
    ProblemType("channel_request_not_found", 404, "No such top-up or withdrawal at this channel"),
    ProblemType("channel_direction_unsupported", 422, "This channel does not serve this direction"),
    ProblemType("channel_account_invalid", 422, "Only user and merchant accounts use channels"),
    ProblemType(
        "callback_signature_invalid", 401, "The callback's signature is missing, wrong or stale"
    ),
    ProblemType("callback_mismatch", 422, "The callback's amount or currency is not the request's"),
    ProblemType("channel_request_timed_out", 409, "The request timed out before the bank answered"),
    ProblemType("channel_callback_conflict", 409, "The request was already resolved otherwise"),
    # Escrow trades (engine/products/trades.py): each refusal changes nothing.
    ProblemType("trade_not_found", 404, "No such trade"),
    ProblemType("trade_state_conflict", 409, "The trade's state does not allow this step"),
    ProblemType("trade_pay_expired", 409, "The time to pay for the trade has passed"),
    ProblemType("trade_refund_window_closed", 409, "The trade's refund window has closed"),
    ProblemType(
        "out_trade_no_taken", 409, "The merchant already has a trade or order with this number"
    ),
    ProblemType("refund_exceeds_paid", 409, "The refund is more than is left to refund"),
    ProblemType("out_request_no_reused", 409, "This refund number was used for another amount"),
    ProblemType("refund_limit_reached", 409, "The trade has taken its most refunds"),
    # Merchant payments (engine/products: orders, payment_codes, bills) said no.
    ProblemType("order_not_found", 404, "No such order"),
    ProblemType("order_state_conflict", 409, "The order's state does not allow this step"),
    ProblemType("order_expired", 409, "The order's time to pay has passed"),
    ProblemType("payment_code_invalid", 422, "No such payment code"),
    ProblemType("payment_code_used", 409, "The payment code was used already"),
    ProblemType("payment_code_expired", 409, "The payment code has expired"),
    ProblemType("biller_not_found", 404, "No such biller"),
    ProblemType("biller_exists", 409, "The account is registered as a biller already"),
    ProblemType("biller_account_invalid", 422, "A biller must be a merchant account"),
    ProblemType("bill_reference_invalid", 422, "The reference does not fit the biller's format"),
    # Risk rules said no. 403 for a frozen account (no request about it will pass until an
    # operator acts), 422 for limits (this request broke one; a smaller or later one may
    # pass: `retry_after_s` and Retry-After say when, for a new request with a new key).
    # Not 429: clients retry a 429 on their own, and with the same key they would only
    # ever get this stored answer back.
    ProblemType(ResultCode.ACCOUNT_FROZEN, 403, "The account is frozen"),
    ProblemType(
        ResultCode.RISK_TRANSFER_LIMIT, 422, "The amount is above the payer's per-transfer limit"
    ),
    ProblemType(
        ResultCode.RISK_DAILY_OUTFLOW_LIMIT, 422, "The payer's daily outflow limit would be passed"
    ),
    ProblemType(
        ResultCode.RISK_VELOCITY_LIMIT, 422, "The payer made too many transfers this minute"
    ),
    ProblemType(
        ResultCode.STEP_UP_REQUIRED,
        403,
        "The payment needs the payer's step-up code, which this product cannot take yet",
    ),
    ProblemType(ResultCode.STEP_UP_NOT_FOUND, 404, "No such step-up"),
    ProblemType(ResultCode.STEP_UP_CODE_INVALID, 422, "The confirmation code is wrong"),
    ProblemType(
        ResultCode.STEP_UP_ATTEMPTS_EXCEEDED, 410, "Too many wrong codes: the step-up is dead"
    ),
    ProblemType(ResultCode.STEP_UP_EXPIRED, 410, "The step-up expired"),
    ProblemType(ResultCode.STEP_UP_ALREADY_CONFIRMED, 409, "The step-up was confirmed already"),
    # Try again: the same request may succeed later. Retry with the same key.
    ProblemType("idempotency_key_in_flight", 409, "A request with this key is in progress"),
    ProblemType("overloaded", 503, "Too many requests are waiting; retry shortly"),
    ProblemType("unavailable", 503, "The ledger's database cannot be reached; retry shortly"),
    ProblemType("conflict", 503, "The accounts were busy; retry with the same key"),
    ProblemType(
        "outcome_unknown", 503, "The connection broke while committing; retry with the same key"
    ),
    # A bug: nothing a client did should cause it.
    ProblemType("internal_error", 500, "An internal error occurred"),
)

RETRY_AFTER_S: Final = {"overloaded": 1, "unavailable": 2, "conflict": 1, "outcome_unknown": 1}


def problem_body(
    code: str, *, detail: str = "", instance: str | None = None, **extensions: Any
) -> tuple[int, bytes]:
    problem_type = PROBLEM_TYPES[code]
    body: dict[str, Any] = {
        "type": f"/problems/{problem_type.code}",
        "title": problem_type.title,
        "status": problem_type.status,
        "code": problem_type.code,
    }
    if detail:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    body.update(extensions)
    return problem_type.status, _ENCODER.encode(body)


# RFC 9110: a 401 names the authentication scheme it wants.
WWW_AUTHENTICATE: Final = 'TXENGINE-SIGNATURE realm="txengine"'


def problem(
    code: str,
    *,
    detail: str = "",
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> web.Response:
    """An `application/problem+json` response for the problem type `code`."""
    status, body = problem_body(code, detail=detail, instance=instance, **extensions)
    headers = dict(headers or {})
    if code in RETRY_AFTER_S:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S[code]))
    elif isinstance(extensions.get("retry_after_s"), int):
        headers.setdefault("Retry-After", str(extensions["retry_after_s"]))
    if status == 401:
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return web.Response(
        status=status, body=body, content_type=PROBLEM_CONTENT_TYPE, headers=headers
    )


class ProblemError(Exception):
    """Raised inside a handler to answer with a problem; the middleware renders it."""

    def __init__(
        self,
        code: str,
        *,
        detail: str = "",
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        assert code in PROBLEM_TYPES, code
        super().__init__(detail or code)
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions
