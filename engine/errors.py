"""The engine's exceptions, in three roots (as asyncpg has them):

- ClientError: the caller misused the engine; retrying the same call will not help.
- RetryableError: a conflict or a passing condition; the same call may succeed later.
- InternalError: a bug or an unexpected database state; someone must look.

Business outcomes such as insufficient funds are not exceptions: they are results.
Database errors are translated into these in one place, `translate_database_error`.
"""

from __future__ import annotations

import asyncio

import asyncpg


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class ClientError(EngineError):
    pass


class InvalidCommand(ClientError):
    """A command no caller should send: an amount out of range, an unknown currency."""


class InvalidCursor(ClientError):
    """A page cursor that this engine never issued for this account."""


class RetryableError(EngineError):
    pass


class IdempotencyKeyInFlight(RetryableError):
    """A request with the same idempotency key is being applied right now."""


class Overloaded(RetryableError):
    """A lane's queue is full; the caller should back off."""


class Unavailable(RetryableError):
    """The database could not be reached or the engine is shutting down."""


class OutcomeUnknown(RetryableError):
    """The connection broke during COMMIT: the batch may or may not have been applied.

    A retry with the same idempotency key tells which.
    """


class Conflict(RetryableError):
    """A lock or serialization conflict that outlived the batch's retries."""


class InternalError(EngineError):
    pass


# SQLSTATEs that mean "try the same transaction again".
_RETRYABLE_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected: cannot happen with ordered locks, but is harmless
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout)
    }
)
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57P")  # connection, resources, shutdown


def translate_database_error(error: BaseException) -> EngineError:
    """Map an exception raised while talking to PostgreSQL to the engine's own."""
    if isinstance(error, EngineError):
        return error
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = str(error.sqlstate or "")
        if sqlstate in _RETRYABLE_SQLSTATES:
            return Conflict(f"{sqlstate}: {error}")
        if sqlstate.startswith(_UNAVAILABLE_SQLSTATE_CLASSES):
            return Unavailable(f"{sqlstate}: {error}")
        return InternalError(f"database error {sqlstate}: {error}")
    if isinstance(
        error,
        OSError
        | asyncpg.InterfaceError
        | asyncio.TimeoutError
        | asyncpg.exceptions.ConnectionDoesNotExistError,
    ):
        return Unavailable(f"database unreachable: {error!r}")
    if isinstance(error, asyncpg.InternalClientError):
        # The connection's protocol state is broken: seen when PostgreSQL dies and an idle
        # connection receives the server's last FATAL message before the socket closes,
        # then the next statement finds "another operation in progress". Nothing of that
        # statement was sent; a new connection is the cure, as for a lost one.
        return Unavailable(f"database connection broken: {error!r}")
    return InternalError(f"unexpected error: {error!r}")
