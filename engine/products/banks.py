"""Bank channels: one adapter per way money enters or leaves a wallet through a bank.

Each adapter is a small class behind one interface (`Channel`): which directions it
serves, how long its bank may take to answer, how it asks the bank (`ask`: one signed
POST of the order to `{base_url}/v1/{channel}/collect` or `/pay`), what the payer needs
to finish a top-up (a redirect, a payment slip), and how it checks that a callback came
from its bank (`verify_callback`).

Both directions are signed with the channel's shared secret, in the manner of Stripe's
webhooks: a header `Bank-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`,
several v1 values allowed (secret rotation), compared in constant time, and refused when
the timestamp is more than 300 s away from our clock (a replayed old callback).

`Banks` holds the configured channels, one aiohttp client and the retry policy. A bank is
asked only after the hold's transaction has committed; an order that cannot be delivered
is tried a bounded number of times and then left to the request's deadline
(engine.products.channels).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import hmac
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Final, Literal

import aiohttp
import msgspec
from msgspec import Meta

from engine.errors import ClientError
from engine.model import INT64_MAX

SIGNATURE_HEADER: Final = "Bank-Signature"
SIGNATURE_TOLERANCE_S: Final = 300
SIGNATURES_PER_HEADER_MAX: Final = 4
CALLBACK_REASON_LENGTH_MAX: Final = 200
_ENCODER: Final = msgspec.json.Encoder()
_log = logging.getLogger("txengine.banks")


class Direction(enum.StrEnum):
    TOPUP = "topup"  # the bank collects from the payer; the wallet is credited
    WITHDRAWAL = "withdrawal"  # the bank pays out; the wallet is debited


class SendOutcome(enum.StrEnum):
    ACCEPTED = "accepted"  # the bank took the order (2xx); its callback will follow
    REFUSED = "refused"  # the bank answered 4xx: sending again would not help
    UNREACHABLE = "unreachable"  # no answer, a timeout or 5xx after every attempt


class CallbackRejected(ClientError):
    """A callback that is not provably from the channel's bank, or not recent."""


class CallbackMalformed(ClientError):
    """A callback signed by the bank whose body is not a callback: the bank's bug."""


class BankCallback(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a bank tells us about one of our requests."""

    request_id: Annotated[str, Meta(pattern=r"^[1-9][0-9]{0,18}$")]
    status: Literal["succeeded", "failed"]
    amount_minor: Annotated[int, Meta(ge=1, le=INT64_MAX)]
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")]
    bank_reference: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    reason: Annotated[str, Meta(max_length=CALLBACK_REASON_LENGTH_MAX)] = ""


class BankOrder(msgspec.Struct, frozen=True, kw_only=True):
    """The part of a channel request a bank needs to act on it."""

    request_id: int
    direction: Direction
    amount_minor: int
    currency: str
    destination: str | None
    deadline_at: datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelConfig:
    base_url: str  # the bank's API, e.g. http://127.0.0.1:8091
    secret: str = dataclasses.field(repr=False)  # shared with the bank; never logged
    deadline_s: int | None = None  # None: the channel's own default

    def __post_init__(self) -> None:
        assert self.base_url.startswith(("http://", "https://")), "base_url must be http(s)"
        assert len(self.secret) >= 16, "a channel secret has at least 16 characters"
        assert self.deadline_s is None or 1 <= self.deadline_s <= 30 * 24 * 3600


# -- signatures ----------------------------------------------------------------------------


def signature(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify_signature(
    secrets: tuple[str, ...], header: str | None, body: bytes, *, now_s: int
) -> None:
    """Raise CallbackRejected unless `header` signs `body` with one of `secrets`, recently."""
    if header is None:
        raise CallbackRejected(f"no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(",", SIGNATURES_PER_HEADER_MAX + 1)[: SIGNATURES_PER_HEADER_MAX + 1]:
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise CallbackRejected(f"malformed {SIGNATURE_HEADER} header")
    if abs(now_s - timestamp) > SIGNATURE_TOLERANCE_S:
        raise CallbackRejected(f"signature timestamp is more than {SIGNATURE_TOLERANCE_S} s away")
    expected = [signature(secret, timestamp, body).encode() for secret in secrets]
    # Every candidate against every secret, no early exit: the time taken says nothing
    # about which byte differed (hmac.compare_digest is constant-time per comparison).
    matched = False
    for candidate in candidates:
        for want in expected:
            matched |= hmac.compare_digest(candidate.encode(), want)
    if not matched:
        raise CallbackRejected("signature does not match")


# -- adapters ------------------------------------------------------------------------------


class Channel:
    """One bank channel. Subclasses set the class attributes and may add to the order
    sent to the bank and to the instructions shown to the payer."""

    name: ClassVar[str]
    title: ClassVar[str]
    directions: ClassVar[frozenset[Direction]] = frozenset(Direction)
    default_deadline_s: ClassVar[int]

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.config.base_url!r})"

    @property
    def deadline_s(self) -> int:
        return self.config.deadline_s or self.default_deadline_s

    def path(self, direction: Direction) -> str:
        operation = "collect" if direction is Direction.TOPUP else "pay"
        return f"/v1/{self.name}/{operation}"

    def order_body(self, order: BankOrder, *, callback_url: str) -> dict[str, Any]:
        """The JSON the bank receives. The bank deduplicates by request_id."""
        return {
            "request_id": str(order.request_id),
            "direction": order.direction.value,
            "amount_minor": order.amount_minor,
            "currency": order.currency,
            "destination": order.destination,
            "deadline_at": order.deadline_at.isoformat(),
            "callback_url": callback_url,
        }

    def instructions(self, order: BankOrder) -> dict[str, Any] | None:
        """What the payer needs to finish a top-up; None when the bank acts alone."""
        return None

    async def ask(
        self,
        session: aiohttp.ClientSession,
        order: BankOrder,
        *,
        callback_url: str,
        now: datetime,
    ) -> SendOutcome | None:
        """One attempt to hand `order` to the bank, signed; None: worth trying again (a 5xx).
        Raises aiohttp.ClientError or TimeoutError when the bank cannot be reached."""
        body = _ENCODER.encode(self.order_body(order, callback_url=callback_url))
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(self.config.secret, int(now.timestamp()), body),
        }
        url = self.config.base_url.rstrip("/") + self.path(order.direction)
        async with session.post(url, data=body, headers=headers) as response:
            if response.status < 300:
                return SendOutcome.ACCEPTED
            if response.status < 500:
                _log.warning(
                    "bank refused an order", extra={"channel": self.name, "status": response.status}
                )
                return SendOutcome.REFUSED
        return None

    def verify_callback(self, header: str | None, body: bytes, *, now: datetime) -> BankCallback:
        """The callback's content, if the channel's bank sent it recently; else raise."""
        verify_signature((self.config.secret,), header, body, now_s=int(now.timestamp()))
        try:
            return msgspec.json.decode(body, type=BankCallback)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            # Signed by the bank but unreadable: a bug on the bank's side, not an attack.
            raise CallbackMalformed(str(exc)) from None


class OnlineBanking(Channel):
    """网银: the payer is sent to the bank's own pages to approve the payment."""

    name = "ebank"
    title = "online banking (网银)"
    default_deadline_s = 30 * 60

    def instructions(self, order: BankOrder) -> dict[str, Any] | None:
        if order.direction is not Direction.TOPUP:
            return None
        url = f"{self.config.base_url}/v1/ebank/checkout/{order.request_id}"
        return {"type": "redirect", "url": url}


class LinkedCard(Channel):
    """卡通: a card linked to the wallet, debited or credited by the bank on its own."""

    name = "card"
    title = "linked bank card (卡通)"
    default_deadline_s = 10 * 60

    def order_body(self, order: BankOrder, *, callback_url: str) -> dict[str, Any]:
        return {**super().order_body(order, callback_url=callback_url), "mode": "automatic"}


class PostalRemittance(Channel):
    """网汇e: a postal remittance, paid in or out at a post office; it can take days."""

    name = "postal"
    title = "postal remittance (网汇e)"
    default_deadline_s = 3 * 24 * 3600

    def instructions(self, order: BankOrder) -> dict[str, Any] | None:
        if order.direction is not Direction.TOPUP:
            return None
        return {"type": "remittance", "remittance_no": payment_reference(order.request_id)}


class ConvenienceCash(Channel):
    """Cash at a convenience store's till: the payer takes a payment slip to the store.
    Stores take cash in, they do not pay out, so this channel serves top-ups only."""

    name = "cash"
    title = "cash at a convenience store"
    directions = frozenset({Direction.TOPUP})
    default_deadline_s = 24 * 3600

    def instructions(self, order: BankOrder) -> dict[str, Any] | None:
        return {
            "type": "payment_slip",
            "reference": payment_reference(order.request_id),
            "amount_minor": order.amount_minor,
            "currency": order.currency,
            "pay_before": order.deadline_at,
        }


CHANNEL_TYPES: Final[tuple[type[Channel], ...]] = (
    OnlineBanking,
    LinkedCard,
    PostalRemittance,
    ConvenienceCash,
)


def payment_reference(request_id: int) -> str:
    """The request id with a Luhn check digit, so a till that mistypes one digit of the
    slip is told at once instead of paying into nothing."""
    digits = str(request_id)
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return digits + str((10 - total % 10) % 10)


# -- the client ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BanksConfig:
    callback_base_url: str  # where banks reach txengine: {this}/v1/channels/{name}/callbacks
    request_timeout_s: float = 5.0  # one attempt to hand an order to a bank
    send_attempts_max: int = 3  # attempts per send, then the request's deadline decides
    retry_backoff_s: float = 0.2  # doubled after each failed attempt

    def __post_init__(self) -> None:
        assert 0 < self.request_timeout_s <= 60
        assert 1 <= self.send_attempts_max <= 10
        assert 0 <= self.retry_backoff_s <= 10


class Banks:
    """The configured channels and one HTTP client to reach their banks."""

    def __init__(self, channels: Mapping[str, ChannelConfig], *, config: BanksConfig) -> None:
        by_name = {channel_type.name: channel_type for channel_type in CHANNEL_TYPES}
        assert set(channels) <= set(by_name), sorted(set(channels) - set(by_name))
        self.config = config
        self.channels: dict[str, Channel] = {
            name: by_name[name](channel_config) for name, channel_config in channels.items()
        }
        self._session: aiohttp.ClientSession | None = None

    def channel(self, name: str) -> Channel | None:
        return self.channels.get(name)

    async def start(self) -> None:
        assert self._session is None
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def callback_url(self, channel: Channel) -> str:
        return f"{self.config.callback_base_url.rstrip('/')}/v1/channels/{channel.name}/callbacks"

    async def send(self, channel: Channel, order: BankOrder, *, now: datetime) -> SendOutcome:
        """Hand `order` to the channel's bank, with bounded retries. Never called inside a
        database transaction: the hold it is about has committed."""
        assert self._session is not None, "Banks.start() first"
        callback_url = self.callback_url(channel)
        backoff_s = self.config.retry_backoff_s
        for attempt in range(1, self.config.send_attempts_max + 1):
            try:
                outcome = await channel.ask(
                    self._session, order, callback_url=callback_url, now=now
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                _log.info(
                    "bank unreachable",
                    extra={"channel": channel.name, "attempt": attempt, "error": repr(exc)},
                )
                outcome = None
            if outcome is not None:
                return outcome
            if attempt < self.config.send_attempts_max:
                await asyncio.sleep(backoff_s)
                backoff_s *= 2
        return SendOutcome.UNREACHABLE
