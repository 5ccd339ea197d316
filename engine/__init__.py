"""txengine's ledger: a sharded, batched, double-entry engine on PostgreSQL.

The public surface is small: open an Engine, submit commands, read accounts and
history, close. Everything else in this package is how that is done.
"""

from engine import risk_settings
from engine.engine import Engine, EngineConfig
from engine.errors import (
    ClientError,
    Conflict,
    EngineError,
    IdempotencyKeyInFlight,
    InternalError,
    InvalidCommand,
    InvalidCursor,
    OutcomeUnknown,
    Overloaded,
    RetryableError,
    Unavailable,
)
from engine.lanes import LaneConfig, Observer
from engine.model import (
    AccountKind,
    AccountView,
    Command,
    ConfirmStepUp,
    CreateAccount,
    CreateTransfers,
    EntryKind,
    EntryView,
    Idempotency,
    Page,
    PostPending,
    Result,
    ResultCode,
    StepUpStatus,
    StepUpView,
    TransferSpec,
    TransferStatus,
    TransferView,
    VoidPending,
)

__all__ = [
    "AccountKind",
    "AccountView",
    "ClientError",
    "Command",
    "ConfirmStepUp",
    "Conflict",
    "CreateAccount",
    "CreateTransfers",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EntryKind",
    "EntryView",
    "Idempotency",
    "IdempotencyKeyInFlight",
    "InternalError",
    "InvalidCommand",
    "InvalidCursor",
    "LaneConfig",
    "Observer",
    "OutcomeUnknown",
    "Overloaded",
    "Page",
    "PostPending",
    "Result",
    "ResultCode",
    "RetryableError",
    "StepUpStatus",
    "StepUpView",
    "TransferSpec",
    "TransferStatus",
    "TransferView",
    "Unavailable",
    "VoidPending",
    "risk_settings",
]
