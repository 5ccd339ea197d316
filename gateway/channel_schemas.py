"""Request types of the bank channels' routes (top-ups and withdrawals).

The bank's callback body is engine.products.banks.BankCallback: the adapter that checks
its signature decodes it.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta

from engine.products.banks import CHANNEL_TYPES
from gateway.schemas import AmountMinor, Currency, IdText, MetadataIn, NotifyUrl

ChannelName = Literal["ebank", "card", "postal", "cash"]
assert set(get_args(ChannelName)) == {t.name for t in CHANNEL_TYPES}, "one name per adapter"

Destination = Annotated[
    str,
    Meta(
        pattern=r"^[0-9A-Za-z]{4,34}$",
        description="The bank account, card or remittance number the bank pays to",
    ),
]


class TopupCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    account_id: IdText
    amount_minor: AmountMinor
    currency: Currency
    channel: ChannelName
    notify_url: NotifyUrl | None = None
    metadata: MetadataIn = msgspec.field(default_factory=dict)


class WithdrawalCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    account_id: IdText
    amount_minor: AmountMinor
    currency: Currency
    channel: ChannelName
    destination: Destination
    notify_url: NotifyUrl | None = None
    metadata: MetadataIn = msgspec.field(default_factory=dict)
