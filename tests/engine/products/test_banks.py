"""Channel adapters: callback signatures, payment references, and handing orders to a
bank (the simulator) with bounded retries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from banksim import BankSimulator, SimConfig
from engine.products.banks import (
    CHANNEL_TYPES,
    BankOrder,
    Banks,
    BanksConfig,
    CallbackMalformed,
    CallbackRejected,
    ChannelConfig,
    Direction,
    SendOutcome,
    payment_reference,
    signature,
    signature_header,
    verify_signature,
)

SECRET = "a-secret-of-enough-length"
BODY = b'{"request_id": "1"}'
NOW = 1_800_000_000


def test_a_signature_made_with_the_secret_verifies() -> None:
    verify_signature((SECRET,), signature_header(SECRET, NOW, BODY), BODY, now_s=NOW)


@pytest.mark.parametrize(
    ("header", "now_s"),
    [
        (None, NOW),
        ("", NOW),
        ("v1=abc", NOW),  # no timestamp
        (f"t={NOW}", NOW),  # no signature
        (f"t={NOW},v1={signature('another-secret-entirely', NOW, BODY)}", NOW),
        (f"t={NOW},v1={signature(SECRET, NOW, BODY + b' ')}", NOW),  # another body
        (f"t={NOW + 1},v1={signature(SECRET, NOW, BODY)}", NOW),  # another timestamp
        (signature_header(SECRET, NOW - 301, BODY), NOW),  # stale
        (signature_header(SECRET, NOW + 301, BODY), NOW),  # from the future
        (f"t=-{NOW},v1={signature(SECRET, NOW, BODY)}", NOW),
        (f"t={'9' * 40},v1=00", NOW),
    ],
)
def test_anything_else_is_rejected(header: str | None, now_s: int) -> None:
    with pytest.raises(CallbackRejected):
        verify_signature((SECRET,), header, BODY, now_s=now_s)


def test_the_tolerance_is_300_seconds_either_way() -> None:
    for skew in (-300, 300):
        verify_signature((SECRET,), signature_header(SECRET, NOW + skew, BODY), BODY, now_s=NOW)


def test_several_signatures_and_secrets_allow_rotation() -> None:
    old, new = "the-old-secret-of-the-bank", "the-new-secret-of-the-bank"
    header = (
        f"t={NOW},v1={signature('wrong-secret-here-xx', NOW, BODY)},v1={signature(new, NOW, BODY)}"
    )
    verify_signature((old, new), header, BODY, now_s=NOW)
    with pytest.raises(CallbackRejected):
        verify_signature((old,), header, BODY, now_s=NOW)


def test_a_signed_callback_with_a_bad_body_is_malformed_not_forged() -> None:
    (ebank,) = [t for t in CHANNEL_TYPES if t.name == "ebank"]
    channel = ebank(ChannelConfig(base_url="http://127.0.0.1:1", secret=SECRET))
    now = datetime.fromtimestamp(NOW, UTC)
    body = b'{"request_id": "1", "status": "maybe"}'
    with pytest.raises(CallbackMalformed):
        channel.verify_callback(signature_header(SECRET, NOW, body), body, now=now)
    with pytest.raises(CallbackRejected):
        channel.verify_callback(signature_header("x" * 20, NOW, body), body, now=now)


def test_payment_references_carry_a_luhn_check_digit() -> None:
    assert payment_reference(7992739871) == "79927398713"  # the textbook example
    reference = payment_reference(251438703249985536)
    assert reference[:-1] == "251438703249985536"
    # Any single mistyped digit gives a reference whose check digit no longer fits.
    for position in range(len(reference) - 1):
        for digit in "0123456789":
            if digit != reference[position]:
                typo = reference[:position] + digit + reference[position + 1 : -1]
                assert payment_reference(int(typo))[-1] != reference[-1] or typo[0] == "0"


def test_channels_serve_their_directions() -> None:
    served = {t.name: t.directions for t in CHANNEL_TYPES}
    assert served["cash"] == {Direction.TOPUP}
    assert served["ebank"] == served["card"] == served["postal"] == set(Direction)
    config = ChannelConfig(base_url="http://127.0.0.1:1", secret=SECRET)
    assert SECRET not in repr(config) and SECRET not in repr(CHANNEL_TYPES[0](config))


def _order(request_id: int = 251438703249985536) -> BankOrder:
    return BankOrder(
        request_id=request_id,
        direction=Direction.TOPUP,
        amount_minor=100,
        currency="CNY",
        destination=None,
        deadline_at=datetime.now(UTC) + timedelta(minutes=5),
    )


async def _banks(url: str, secret: str = "txengine-dev-secret-ebank") -> Banks:
    banks = Banks(
        {"ebank": ChannelConfig(base_url=url, secret=secret)},
        config=BanksConfig(
            callback_base_url="http://127.0.0.1:9/", request_timeout_s=1, retry_backoff_s=0
        ),
    )
    await banks.start()
    return banks


async def test_an_order_reaches_the_bank_once_however_often_it_is_sent() -> None:
    bank = BankSimulator(SimConfig(silence_rate=1.0))
    banks = await _banks(await bank.start())
    try:
        channel = banks.channel("ebank")
        assert channel is not None
        now = datetime.now(UTC)
        assert await banks.send(channel, _order(), now=now) is SendOutcome.ACCEPTED
        assert await banks.send(channel, _order(), now=now) is SendOutcome.ACCEPTED
        assert bank.stats["orders"] == 1 and bank.stats["repeats"] == 1
        (order,) = bank.orders.values()
        assert order.operation == "collect"
        assert order.callback_url == "http://127.0.0.1:9/v1/channels/ebank/callbacks"
    finally:
        await banks.close()
        await bank.stop()


async def test_a_bank_that_refuses_or_is_away_is_reported_after_bounded_tries() -> None:
    bank = BankSimulator(SimConfig(silence_rate=1.0))
    url = await bank.start()
    banks = await _banks(url, secret="not-the-bank-secret-at-all")
    try:
        channel = banks.channel("ebank")
        assert channel is not None
        now = datetime.now(UTC)
        assert await banks.send(channel, _order(), now=now) is SendOutcome.REFUSED
        assert bank.stats["refused"] == 1 and bank.orders == {}
        await bank.stop()
        assert await banks.send(channel, _order(), now=now) is SendOutcome.UNREACHABLE
    finally:
        await banks.close()
        await bank.stop()
