"""The fee rounding rule, written down in engine/products/fees.py, checked here."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.model import INT64_MAX
from engine.products.fees import RATE_BP_MAX, fee_minor


@pytest.mark.parametrize(
    ("amount", "rate", "fee"),
    [
        (10_000, 60, 60),  # 100.00 yuan at 0.6 % is 0.60
        (83, 60, 0),  # 0.498 fen rounds down
        (84, 60, 1),  # 0.504 fen rounds up
        (250, 20, 1),  # exactly half a fen rounds up
        (249, 20, 0),
        (1, 0, 0),
        (1, RATE_BP_MAX, 1),
        (INT64_MAX, RATE_BP_MAX, INT64_MAX),
        (INT64_MAX, 1, (INT64_MAX + 5_000) // 10_000),
    ],
)
def test_fee_rounds_half_up_to_the_fen(amount: int, rate: int, fee: int) -> None:
    assert fee_minor(amount, rate) == fee


@given(st.integers(1, INT64_MAX), st.integers(0, RATE_BP_MAX))
def test_fee_is_the_nearest_fen_and_never_exceeds_the_amount(amount: int, rate: int) -> None:
    fee = fee_minor(amount, rate)
    assert 0 <= fee <= amount
    exact_times_2 = 2 * amount * rate  # 2 × 10,000 × the exact fee, in integers
    assert abs(fee * 2 * RATE_BP_MAX - exact_times_2) <= RATE_BP_MAX  # within half a fen
    if fee * 2 * RATE_BP_MAX - exact_times_2 == -RATE_BP_MAX:
        raise AssertionError("an exact half must round up")
