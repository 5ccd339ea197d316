"""Merchant fees: the house's share of each settlement to a merchant.

The rule, for every product that pays a merchant: fee = amount × rate_bp / 10,000,
rounded half up to a whole minor unit (四舍五入 on the fen), so 0.5 fen and more is one
fen and less is none; never more than the amount. The fee is a transfer from the merchant
to the house's fee account in the currency (house account "fees"), in the same linked
group (or the same step transaction) as the payment that credits the merchant, so the
merchant is never credited without the fee being taken, nor the other way round.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import asyncpg

from engine.model import INT64_MAX, TransferSpec
from engine.products.step import Step

RATE_BP_MAX: Final = 10_000  # 100 %
FEES_HOUSE_ACCOUNT: Final = "fees"

_RATE: Final = "SELECT rate_bp FROM merchant_fees WHERE account_id = $1"
_SET_RATE: Final = """
INSERT INTO merchant_fees (account_id, rate_bp, updated_at) VALUES ($1, $2, $3)
ON CONFLICT (account_id) DO UPDATE SET rate_bp = EXCLUDED.rate_bp, updated_at = EXCLUDED.updated_at
"""


def fee_minor(amount_minor: int, rate_bp: int) -> int:
    """The fee on `amount_minor` at `rate_bp`, rounded half up to a whole minor unit."""
    assert 0 < amount_minor <= INT64_MAX, amount_minor
    assert 0 <= rate_bp <= RATE_BP_MAX, rate_bp
    # Integers only: amount × rate fits easily in Python's ints, never in a float.
    fee = (amount_minor * rate_bp + RATE_BP_MAX // 2) // RATE_BP_MAX
    assert 0 <= fee <= amount_minor
    return fee


async def rate_bp(conn: asyncpg.Connection, merchant_account_id: int) -> int:
    found = await conn.fetchval(_RATE, merchant_account_id)
    return 0 if found is None else int(found)


async def set_rate_bp(
    conn: asyncpg.Connection, merchant_account_id: int, rate: int, *, now: datetime
) -> None:
    """Set a merchant's rate (an operator action). Settlements after it use the new rate."""
    assert 0 <= rate <= RATE_BP_MAX, rate
    await conn.execute(_SET_RATE, merchant_account_id, rate, now)


async def fee_spec(
    step: Step, *, merchant_account_id: int, amount_minor: int, currency: str
) -> TransferSpec | None:
    """The fee transfer for a settlement of `amount_minor` to the merchant, or None when
    the fee rounds to nothing. Put it in the same linked group as the payment."""
    rate = await rate_bp(step.conn, merchant_account_id)
    fee = fee_minor(amount_minor, rate)
    if fee == 0:
        return None
    fees_account = await step.house_account(FEES_HOUSE_ACCOUNT, currency)
    return TransferSpec(
        debit_account_id=merchant_account_id,
        credit_account_id=fees_account,
        amount_minor=fee,
        currency=currency,
        metadata={"fee_rate_bp": str(rate)},
    )
