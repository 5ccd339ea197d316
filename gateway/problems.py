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
    return {t.code: t for t in types}


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
    ProblemType(ResultCode.ACCOUNTS_MUST_DIFFER, 422, "Debit and credit accounts are the same"),
    ProblemType(ResultCode.CURRENCY_MISMATCH, 422, "The accounts and transfer currencies differ"),
    ProblemType(ResultCode.INSUFFICIENT_FUNDS, 422, "The debit account has too little money"),
    ProblemType(ResultCode.OVERFLOW, 422, "An account's totals would exceed their limit"),
    ProblemType(ResultCode.LINKED_TRANSFER_FAILED, 422, "Another transfer of the group failed"),
    ProblemType(ResultCode.TRANSFER_NOT_PENDING, 409, "The transfer is not a pending hold"),
    ProblemType(ResultCode.TRANSFER_ALREADY_RESOLVED, 409, "The hold was posted or voided"),
    ProblemType(ResultCode.PENDING_TRANSFER_EXPIRED, 409, "The hold's timeout has passed"),
    ProblemType(
        ResultCode.POST_AMOUNT_EXCEEDS_PENDING, 422, "Cannot post more than the hold holds"
    ),
    ProblemType(
        ResultCode.IDEMPOTENCY_KEY_REUSED, 422, "The key was used before with another request"
    ),
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
