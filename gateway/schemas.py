"""Request and response types of the HTTP API, and their JSON.

Requests are decoded by msgspec straight into typed structs that refuse unknown fields,
wrong types, floats for integers and out-of-range numbers, so a handler only ever sees
a valid request. Ids travel as decimal strings because they are 63-bit integers and
JSON numbers above 2^53 lose digits in many clients; amounts are JSON integers in minor
units (int64).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, TypeVar

import msgspec
from msgspec import Meta

from engine import (
    AccountKind,
    AccountView,
    EntryView,
    Page,
    StepUpView,
    TransferSpec,
    TransferView,
)
from engine.model import (
    HOLD_TIMEOUT_S_MAX,
    INT64_MAX,
    LINKED_TRANSFERS_MAX,
    METADATA_KEY_LENGTH_MAX,
    METADATA_KEYS_MAX,
    METADATA_VALUE_LENGTH_MAX,
    RESERVED_METADATA_PREFIX,
    STEP_UP_CODE_DIGITS,
    is_known_currency,
    metadata_error,
)
from engine.products.terms import (
    NOTIFY_URL_LENGTH_MAX,
    NOTIFY_URL_PATTERN,
    OUT_NO_PATTERN,
    SUBJECT_LENGTH_MAX,
)
from gateway.problems import ProblemError

ID_PATTERN: Final = r"^[1-9][0-9]{0,18}$"
_ID_RE: Final = re.compile(ID_PATTERN)

IdText = Annotated[str, Meta(pattern=ID_PATTERN, description="A 63-bit id, as a decimal string")]
AmountMinor = Annotated[
    int, Meta(ge=1, le=INT64_MAX, description="Minor units of the currency (fen for CNY)")
]
Currency = Annotated[str, Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
# The products' shared terms (engine/products/terms.py).
OutNo = Annotated[
    str, Meta(pattern=OUT_NO_PATTERN, description="1 to 64 letters, digits or underscores")
]
# Free text that reaches a text column: PostgreSQL refuses the NUL character outright
# (an error 500 if it got that far), so the schema refuses it first.
NO_NUL_PATTERN: Final = r"^[^\x00]*$"


def free_text(*, min_length: int = 1, max_length: int) -> Meta:
    return Meta(pattern=NO_NUL_PATTERN, min_length=min_length, max_length=max_length)


Subject = Annotated[str, free_text(max_length=SUBJECT_LENGTH_MAX)]
NotifyUrl = Annotated[
    str,
    Meta(
        pattern=NOTIFY_URL_PATTERN,
        max_length=NOTIFY_URL_LENGTH_MAX,
        description="Where events about this resource are delivered (signed webhooks)",
    ),
]
MetadataIn = Annotated[
    dict[
        Annotated[str, Meta(min_length=1, max_length=METADATA_KEY_LENGTH_MAX)],
        Annotated[str, Meta(max_length=METADATA_VALUE_LENGTH_MAX)],
    ],
    Meta(max_length=METADATA_KEYS_MAX),
]


class AccountCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    currency: Currency
    kind: AccountKind
    metadata: MetadataIn = msgspec.field(default_factory=dict)


class TransferCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    debit_account_id: IdText
    credit_account_id: IdText
    amount_minor: AmountMinor
    currency: Currency
    pending: bool = False
    timeout_s: Annotated[int, Meta(ge=1, le=HOLD_TIMEOUT_S_MAX)] | None = None
    metadata: MetadataIn = msgspec.field(default_factory=dict)


class TransferGroupCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    transfers: Annotated[list[TransferCreate], Meta(min_length=1, max_length=LINKED_TRANSFERS_MAX)]


class StepUpConfirm(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    code: Annotated[
        str,
        # The lengths too: "$" also matches before a trailing newline.
        Meta(
            pattern=f"^[0-9]{{{STEP_UP_CODE_DIGITS}}}$",
            min_length=STEP_UP_CODE_DIGITS,
            max_length=STEP_UP_CODE_DIGITS,
            description="The one-time code sent to the payer",
        ),
    ]


class TransferPost(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount_minor: AmountMinor | None = None  # omitted: post the whole hold


class TransferVoid(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


T = TypeVar("T", bound=msgspec.Struct)

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_PATH_IN_MESSAGE: Final = re.compile(r" - at `(?P<path>[^`]*)`$")


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode and validate `body` as `type_`, or raise a validation ProblemError."""
    decoder = _DECODERS.get(type_)
    if decoder is None:
        decoder = _DECODERS[type_] = msgspec.json.Decoder(type_)
    try:
        value: T = decoder.decode(body or b"{}")
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH_IN_MESSAGE.search(message)
        path = match["path"] if match else "$"
        raise ProblemError(
            "validation_error", detail=message, errors=[{"path": path, "message": message}]
        ) from None
    except msgspec.DecodeError as exc:
        raise ProblemError("invalid_json", detail=str(exc)) from None
    except UnicodeDecodeError:  # msgspec lets this through for bytes that are not UTF-8
        raise ProblemError("invalid_json", detail="the body is not UTF-8") from None
    return value


def invalid(path: str, message: str) -> ProblemError:
    return ProblemError(
        "validation_error", detail=message, errors=[{"path": path, "message": message}]
    )


def parse_id(text: str) -> int | None:
    """An id from a path segment or query; None if it cannot be one of ours."""
    if not _ID_RE.fullmatch(text):  # match() would let a trailing newline through "$"
        return None
    value = int(text)
    return value if value <= INT64_MAX else None


def _body_id(text: str, path: str) -> int:
    value = parse_id(text)
    if value is None:
        raise invalid(path, f"{text!r} is not a valid id")
    return value


def transfer_spec(body: TransferCreate, *, path: str = "$") -> TransferSpec:
    """Check what the types cannot say, and build the engine's transfer."""
    if not is_known_currency(body.currency):
        raise invalid(f"{path}.currency", f"unknown currency {body.currency!r}")
    debit = _body_id(body.debit_account_id, f"{path}.debit_account_id")
    credit = _body_id(body.credit_account_id, f"{path}.credit_account_id")
    if debit == credit:
        raise invalid(f"{path}.credit_account_id", "debit and credit accounts must differ")
    if body.timeout_s is not None and not body.pending:
        raise invalid(f"{path}.timeout_s", "timeout_s applies to pending transfers only")
    _check_metadata(body.metadata, path)
    return TransferSpec(
        debit_account_id=debit,
        credit_account_id=credit,
        amount_minor=body.amount_minor,
        currency=body.currency,
        pending=body.pending,
        timeout_s=body.timeout_s,
        metadata=body.metadata,
    )


def _check_metadata(metadata: dict[str, str], path: str) -> None:
    error = metadata_error(metadata)
    if error is None and any(k.startswith(RESERVED_METADATA_PREFIX) for k in metadata):
        error = f"metadata keys starting with {RESERVED_METADATA_PREFIX!r} are reserved"
    if error is not None:
        raise invalid(f"{path}.metadata", error)


def check_account_create(body: AccountCreate) -> None:
    if not is_known_currency(body.currency):
        raise invalid("$.currency", f"unknown currency {body.currency!r}")
    _check_metadata(body.metadata, "$")


# -- responses ---------------------------------------------------------------------------

_ENCODER: Final = msgspec.json.Encoder()


def account_json(account: AccountView) -> dict[str, Any]:
    return {
        "object": "account",
        "id": str(account.id),
        "currency": account.currency,
        "kind": account.kind.value,
        "overdraft_allowed": account.overdraft_allowed,
        "balance": {
            "posted_minor": account.posted_minor,
            "pending_minor": account.pending_minor,
            "available_minor": account.available_minor,
        },
        "debits_posted_minor": account.debits_posted_minor,
        "credits_posted_minor": account.credits_posted_minor,
        "debits_pending_minor": account.debits_pending_minor,
        "credits_pending_minor": account.credits_pending_minor,
        "metadata": account.metadata,
        "created_at": account.created_at,
    }


def transfer_json(transfer: TransferView) -> dict[str, Any]:
    return {
        "object": "transfer",
        "id": str(transfer.id),
        "debit_account_id": str(transfer.debit_account_id),
        "credit_account_id": str(transfer.credit_account_id),
        "currency": transfer.currency,
        "amount_minor": transfer.amount_minor,
        "posted_amount_minor": transfer.posted_amount_minor,
        "status": transfer.status.value,
        "pending": transfer.pending,
        "group_id": None if transfer.group_id is None else str(transfer.group_id),
        "metadata": transfer.metadata,
        "expires_at": transfer.expires_at,
        "created_at": transfer.created_at,
        "resolved_at": transfer.resolved_at,
    }


def step_up_json(step_up: StepUpView) -> dict[str, Any]:
    return {
        "object": "step_up",
        "id": str(step_up.id),
        "status": "pending",
        "account_id": str(step_up.account_id),
        "expires_at": step_up.expires_at,
        "attempts_max": step_up.attempts_max,
        "confirm_url": f"/v1/step-ups/{step_up.id}/confirm",
    }


def entry_json(entry: EntryView) -> dict[str, Any]:
    return {
        "object": "entry",
        "id": str(entry.id),
        "account_id": str(entry.account_id),
        "transfer_id": str(entry.transfer_id),
        "kind": entry.kind.value,
        "posted_delta_minor": entry.posted_delta_minor,
        "pending_delta_minor": entry.pending_delta_minor,
        "posted_after_minor": entry.posted_after_minor,
        "pending_after_minor": entry.pending_after_minor,
        "created_at": entry.created_at,
    }


def page_json(page: Page) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [entry_json(e) for e in page.entries],
        "has_more": page.has_more,
    }


def group_json(transfers: tuple[TransferView, ...]) -> dict[str, Any]:
    group_id = transfers[0].group_id if transfers else None
    return {
        "object": "transfer_group",
        "id": None if group_id is None else str(group_id),
        "transfers": [transfer_json(t) for t in transfers],
    }


def encode(value: Any) -> bytes:
    return _ENCODER.encode(value)
