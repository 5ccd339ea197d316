"""Payment codes (付款码): the payer's app shows a short-lived, single-use code bound to
one of the payer's accounts; the merchant's till scans it and charges it, which creates
an order and pays it in the same step.

A code is 18 digits like Alipay's: the prefix "28" and 16 random digits (53 bits),
enough for a code that lives `CODE_LIFETIME` and is tried against one payer. Only its
SHA-256 is stored and the code is found by that hash, so neither the table nor the
lookup's timing gives a live code away. A refused charge (insufficient funds, a wrong
currency) leaves the code unused, as the step's savepoint rolls back; a charge that
succeeded marks it used for good. Codes are deleted `CODE_RETENTION` after they expired
(the timer job `payment_codes.reap`); the order a code paid keeps its payer.

The answer to the issuing request, stored under its Idempotency-Key so that a retry gets
the same code, does hold the code itself: for its 60 seconds of life, the key's record is
as good as the code. A retry after that returns a dead code.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

import msgspec

from engine.model import ResultCode
from engine.products.orders import (
    NewOrder,
    OrderSource,
    OrderView,
    StepFn,
    insert_order,
    settle,
)
from engine.products.step import Refusal, Step
from engine.products.timers import TimerJob

if TYPE_CHECKING:
    from engine.engine import Engine

CODE_PREFIX: Final = "28"
CODE_RANDOM_DIGITS: Final = 16
CODE_LENGTH: Final = len(CODE_PREFIX) + CODE_RANDOM_DIGITS  # 18
CODE_LIFETIME: Final = timedelta(seconds=60)
CODE_RETENTION: Final = timedelta(days=1)  # kept after expiry, for support questions
# A charged order is paid at once; its deadline only bounds a step that never finishes.
_CHARGE_TIMEOUT: Final = timedelta(minutes=1)

_INSERT: Final = """
INSERT INTO payment_codes (code_sha256, scope, payer_account_id, expires_at, created_at)
VALUES ($1, $2, $3, $4, $5)
"""
_LOCK: Final = """
SELECT payer_account_id, expires_at, used_at FROM payment_codes
WHERE code_sha256 = $1 AND scope = $2 FOR UPDATE
"""
_REAP: Final = """
DELETE FROM payment_codes WHERE code_sha256 IN (
    SELECT code_sha256 FROM payment_codes WHERE expires_at < $1 ORDER BY expires_at LIMIT $2
)
"""
_USED: Final = "UPDATE payment_codes SET used_at = $2, order_id = $3 WHERE code_sha256 = $1"


class PaymentCodeView(msgspec.Struct, frozen=True, kw_only=True):
    code: str  # shown to the payer once, as digits and a barcode/QR; never stored
    payer_account_id: int
    expires_at: datetime
    created_at: datetime


class Charge(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    merchant_account_id: int
    out_trade_no: str
    subject: str
    amount_minor: int
    currency: str
    notify_url: str | None = None


def code_sha256(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


def new_code() -> str:
    return CODE_PREFIX + str(secrets.randbelow(10**CODE_RANDOM_DIGITS)).zfill(CODE_RANDOM_DIGITS)


def issue(*, payer_account_id: int) -> StepFn[PaymentCodeView]:
    """The step of the payer's app asking for a code for one of the payer's accounts."""

    async def run(step: Step) -> PaymentCodeView:
        if await step.account(payer_account_id) is None:
            raise Refusal(ResultCode.ACCOUNT_NOT_FOUND, f"no account {payer_account_id}")
        code = new_code()
        expires_at = step.now + CODE_LIFETIME
        await step.conn.execute(
            _INSERT, code_sha256(code), step.scope, payer_account_id, expires_at, step.now
        )
        return PaymentCodeView(
            code=code, payer_account_id=payer_account_id, expires_at=expires_at, created_at=step.now
        )

    return run


def charge(request: Charge) -> StepFn[OrderView]:
    """The step of a till charging a payment code: lock the code, create the order, pay it
    from the code's payer account, mark the code used."""

    async def run(step: Step) -> OrderView:
        digest = code_sha256(request.code)
        row = await step.conn.fetchrow(_LOCK, digest, step.scope)
        if row is None:
            raise Refusal("payment_code_invalid", "no such payment code")
        if row["used_at"] is not None:
            raise Refusal("payment_code_used", "this payment code was used already")
        if row["expires_at"] <= step.now:
            raise Refusal("payment_code_expired", "this payment code has expired")
        new = NewOrder(
            merchant_account_id=request.merchant_account_id,
            out_trade_no=request.out_trade_no,
            subject=request.subject,
            amount_minor=request.amount_minor,
            currency=request.currency,
            timeout=_CHARGE_TIMEOUT,
            notify_url=request.notify_url,
        )
        order = await insert_order(step, new, source=OrderSource.PAYMENT_CODE, code=None)
        paid = await settle(step, order, payer_account_id=row["payer_account_id"])
        await step.conn.execute(_USED, digest, step.now, paid.id)
        return paid

    return run


async def reap(engine: Engine, *, now: datetime, limit: int) -> int:
    """The timer job: delete up to `limit` codes that expired over CODE_RETENTION ago."""
    async with engine.step_pool.acquire() as conn:
        status = await conn.execute(_REAP, now - CODE_RETENTION, limit)
    return int(status.split()[-1])  # "DELETE n"


REAP_JOB: Final = TimerJob(name="payment_codes.reap", run_once=reap, batch_size_max=1_000)
