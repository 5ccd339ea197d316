"""The ledger's nouns: accounts, transfers, entries, the commands that change them and
the results those commands give.

Everything here is plain data. Commands and results are msgspec structs because a
result is stored, byte for byte, in the idempotency record of the request that caused
it and decoded again on a retry.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Final

import msgspec

from engine.currency import CURRENCY_EXPONENTS

INT64_MAX: Final = 2**63 - 1
IDEMPOTENCY_KEY_LENGTH_MAX: Final = 255
METADATA_KEYS_MAX: Final = 20
METADATA_KEY_LENGTH_MAX: Final = 40
METADATA_VALUE_LENGTH_MAX: Final = 500
LINKED_TRANSFERS_MAX: Final = 64
HOLD_TIMEOUT_S_MAX: Final = 30 * 24 * 3600
# A hold whose metadata carries this key belongs to a product (an escrow trade): only the
# product's own steps, acting as the operator (scope None), may post or void it, so a
# partner cannot release a trade's money behind the trade's back. Partners may not set
# keys with the "txengine." prefix (the gateway refuses them).
PRODUCT_METADATA_KEY: Final = "txengine.product"
RESERVED_METADATA_PREFIX: Final = "txengine."
STEP_UP_CODE_DIGITS: Final = 6

Metadata = dict[str, str]


class AccountKind(enum.StrEnum):
    USER = "user"  # a person's wallet: may never go below zero
    MERCHANT = "merchant"  # a shop, biller or platform: may never go below zero
    SYSTEM = "system"  # the house's own books (bank clearing, fees): may go negative


class TransferStatus(enum.StrEnum):
    PENDING = "pending"  # a hold: the debit account's money is reserved, not moved
    POSTED = "posted"  # money moved (an immediate transfer, or a hold posted in full or part)
    VOIDED = "voided"  # a hold released on request; nothing moved
    EXPIRED = "expired"  # a hold released by the sweeper when its timeout passed


class EntryKind(enum.StrEnum):
    TRANSFER = "transfer"  # an immediate transfer moved posted money
    HOLD = "hold"  # a pending transfer reserved money
    POST = "post"  # a hold was posted: pending released, posted moved
    VOID = "void"  # a hold was voided: pending released
    EXPIRE = "expire"  # a hold timed out: pending released


class ResultCode(enum.StrEnum):
    """Why a command failed, or OK. These are business outcomes, stored and replayed."""

    OK = "ok"
    ACCOUNT_NOT_FOUND = "account_not_found"
    ACCOUNTS_MUST_DIFFER = "accounts_must_differ"
    CURRENCY_MISMATCH = "currency_mismatch"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    OVERFLOW = "overflow"
    LINKED_TRANSFER_FAILED = "linked_transfer_failed"
    TRANSFER_NOT_FOUND = "transfer_not_found"
    TRANSFER_NOT_PENDING = "transfer_not_pending"
    TRANSFER_ALREADY_RESOLVED = "transfer_already_resolved"
    PENDING_TRANSFER_EXPIRED = "pending_transfer_expired"
    POST_AMOUNT_EXCEEDS_PENDING = "post_amount_exceeds_pending"
    TRANSFER_HELD_BY_PRODUCT = "transfer_held_by_product"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    # Risk rules said no (engine.risk). Recorded in risk_refusals with the reason.
    ACCOUNT_FROZEN = "account_frozen"
    RISK_TRANSFER_LIMIT = "risk_transfer_limit"
    RISK_DAILY_OUTFLOW_LIMIT = "risk_daily_outflow_limit"
    RISK_VELOCITY_LIMIT = "risk_velocity_limit"
    # Not a refusal: the transfer waits for the payer's one-time code (Result.step_up).
    STEP_UP_REQUIRED = "step_up_required"
    STEP_UP_NOT_FOUND = "step_up_not_found"
    STEP_UP_CODE_INVALID = "step_up_code_invalid"
    STEP_UP_ATTEMPTS_EXCEEDED = "step_up_attempts_exceeded"
    STEP_UP_EXPIRED = "step_up_expired"
    STEP_UP_ALREADY_CONFIRMED = "step_up_already_confirmed"


class StepUpStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for the payer's code (until expires_at)
    CONFIRMED = "confirmed"  # the right code came: the transfer ran once, with its result
    LOCKED = "locked"  # too many wrong codes: dead, the transfer never runs


def is_known_currency(code: str) -> bool:
    return code in CURRENCY_EXPONENTS


# ---------------------------------------------------------------------------------------
# Commands. `scope` is the caller the command acts for: it sees only its own accounts and
# transfers. None is the operator (the sweeper, the CLI), which sees everything.


class CreateAccount(msgspec.Struct, frozen=True, kw_only=True, tag="create_account"):
    currency: str
    kind: AccountKind
    metadata: Metadata = msgspec.field(default_factory=dict)
    scope: str | None = None


class TransferSpec(msgspec.Struct, frozen=True, kw_only=True):
    debit_account_id: int
    credit_account_id: int
    amount_minor: int
    currency: str
    pending: bool = False
    timeout_s: int | None = None  # holds only: void automatically this long after creation
    metadata: Metadata = msgspec.field(default_factory=dict)


class CreateTransfers(msgspec.Struct, frozen=True, kw_only=True, tag="create_transfers"):
    """One transfer, or a linked group whose transfers succeed or fail together."""

    transfers: tuple[TransferSpec, ...]
    linked: bool = False
    scope: str | None = None


class PostPending(msgspec.Struct, frozen=True, kw_only=True, tag="post_pending"):
    transfer_id: int
    amount_minor: int | None = None  # None posts the whole hold; less releases the rest
    scope: str | None = None


class VoidPending(msgspec.Struct, frozen=True, kw_only=True, tag="void_pending"):
    transfer_id: int
    expired: bool = False  # set by the sweeper: the hold's timeout passed
    scope: str | None = None


class ConfirmStepUp(msgspec.Struct, frozen=True, kw_only=True, tag="confirm_step_up"):
    """The payer's one-time code for a step-up challenge: runs its transfer once."""

    challenge_id: int
    code: str
    scope: str | None = None


Command = CreateAccount | CreateTransfers | PostPending | VoidPending | ConfirmStepUp


class Idempotency(msgspec.Struct, frozen=True, kw_only=True):
    """A request's idempotency key, scoped to its caller, and the fingerprint of its body."""

    scope: str
    key: str
    fingerprint: bytes


# ---------------------------------------------------------------------------------------
# Views: what readers and results show.


class AccountView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    currency: str
    kind: AccountKind
    overdraft_allowed: bool
    debits_posted_minor: int
    credits_posted_minor: int
    debits_pending_minor: int
    credits_pending_minor: int
    metadata: Metadata
    created_at: datetime

    @property
    def posted_minor(self) -> int:
        return self.credits_posted_minor - self.debits_posted_minor

    @property
    def pending_minor(self) -> int:
        return self.credits_pending_minor - self.debits_pending_minor

    @property
    def available_minor(self) -> int:
        # Incoming holds are not spendable yet; outgoing holds are already spoken for.
        return self.credits_posted_minor - self.debits_posted_minor - self.debits_pending_minor


class TransferView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    debit_account_id: int
    credit_account_id: int
    currency: str
    amount_minor: int
    posted_amount_minor: int
    status: TransferStatus
    pending: bool
    group_id: int | None
    metadata: Metadata
    expires_at: datetime | None
    created_at: datetime
    resolved_at: datetime | None


class EntryView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    account_id: int
    transfer_id: int
    kind: EntryKind
    posted_delta_minor: int
    pending_delta_minor: int
    posted_after_minor: int
    pending_after_minor: int
    created_at: datetime


class StepUpView(msgspec.Struct, frozen=True, kw_only=True):
    """A step-up challenge as its creator sees it: never the code."""

    id: int
    account_id: int  # the payer, whose phone got the code
    expires_at: datetime
    attempts_max: int


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to one command. Stored in the idempotency record and replayed on retry.

    code is OK, or the reason of the first failure; failed_index is the position of the
    transfer that failed within a CreateTransfers command.
    """

    code: ResultCode
    detail: str = ""
    account: AccountView | None = None
    transfers: tuple[TransferView, ...] = ()
    failed_index: int | None = None
    retry_after_s: int | None = None  # risk limits: when a new request could pass
    attempts_left: int | None = None  # a wrong step-up code: tries before the challenge dies
    step_up: StepUpView | None = None  # STEP_UP_REQUIRED: the challenge to confirm
    replayed: bool = False  # set on the way out when this answer came from the store

    @property
    def ok(self) -> bool:
        return self.code is ResultCode.OK


class Page(msgspec.Struct, frozen=True, kw_only=True):
    entries: tuple[EntryView, ...]
    has_more: bool


RESULT_ENCODER: Final = msgspec.json.Encoder()
RESULT_DECODER: Final = msgspec.json.Decoder(Result)


def encode_result(result: Result) -> bytes:
    return RESULT_ENCODER.encode(result)


def decode_result(data: bytes) -> Result:
    return RESULT_DECODER.decode(data)


def command_error(command: Command) -> str | None:
    """Why `command` is malformed, or None. Checked before a command joins a batch, so
    one caller's mistake can never fail the other requests of its batch."""
    if isinstance(command, CreateAccount):
        if not is_known_currency(command.currency):
            return "unknown currency"
        return metadata_error(command.metadata)
    if isinstance(command, CreateTransfers):
        if not 1 <= len(command.transfers) <= LINKED_TRANSFERS_MAX:
            return f"a command carries 1 to {LINKED_TRANSFERS_MAX} transfers"
        for spec in command.transfers:
            error = _transfer_spec_error(spec)
            if error is not None:
                return error
        return None
    if isinstance(command, ConfirmStepUp):
        if not 0 < command.challenge_id <= INT64_MAX:
            return "challenge id out of range"
        code = command.code
        if not (len(code) == STEP_UP_CODE_DIGITS and code.isascii() and code.isdigit()):
            return f"the code is {STEP_UP_CODE_DIGITS} digits"
        return None
    if not 0 < command.transfer_id <= INT64_MAX:
        return "transfer id out of range"
    if isinstance(command, PostPending) and command.amount_minor is not None:
        return None if 0 < command.amount_minor <= INT64_MAX else "amount out of range"
    return None


def _transfer_spec_error(spec: TransferSpec) -> str | None:
    if not (0 < spec.debit_account_id <= INT64_MAX and 0 < spec.credit_account_id <= INT64_MAX):
        return "account id out of range"
    if not 0 < spec.amount_minor <= INT64_MAX:
        return "amount out of range"
    if not is_known_currency(spec.currency):
        return "unknown currency"
    if spec.timeout_s is not None and not (
        spec.pending and 0 < spec.timeout_s <= HOLD_TIMEOUT_S_MAX
    ):
        return "timeout_s applies to pending transfers, 1 s to 30 days"
    return metadata_error(spec.metadata)


def metadata_error(metadata: Metadata) -> str | None:
    """Why `metadata` cannot be stored, or None. PostgreSQL's jsonb refuses the NUL
    character, and a refusal inside a batch would fail every request of that batch."""
    if len(metadata) > METADATA_KEYS_MAX:
        return f"metadata holds at most {METADATA_KEYS_MAX} keys"
    for key, value in metadata.items():
        if not 1 <= len(key) <= METADATA_KEY_LENGTH_MAX:
            return f"metadata keys are 1 to {METADATA_KEY_LENGTH_MAX} characters"
        if len(value) > METADATA_VALUE_LENGTH_MAX:
            return f"metadata values are at most {METADATA_VALUE_LENGTH_MAX} characters"
        if "\x00" in key or "\x00" in value:
            return "metadata may not contain the NUL character"
    return None
