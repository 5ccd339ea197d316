"""The Idempotency-Key header's HTTP semantics (IETF draft-ietf-httpapi-idempotency-key-header).

The key is required on every state-changing POST, at most 255 characters, scoped to the
caller. The fingerprint covers the operation, the path and the validated body in a
canonical encoding, so the same request with its fields in another order or other
white space is still the same request, while any change of meaning is not.
Storing the key and replaying its answer is the engine's work (engine.store).
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec
from aiohttp import web

from engine import Idempotency
from engine.model import IDEMPOTENCY_KEY_LENGTH_MAX
from gateway.problems import ProblemError

HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
_CANONICAL: Final = msgspec.json.Encoder(order="deterministic")


def parse_key(raw: str | None) -> str:
    """The key of a request, or a ProblemError saying what is wrong with it."""
    if raw is None:
        raise ProblemError("idempotency_key_missing", detail=f"send an {HEADER} header")
    # The draft writes the key as a structured-field string ("..."); plain tokens are
    # what most clients send. Accept both.
    key = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_LENGTH_MAX:
        raise ProblemError(
            "idempotency_key_invalid",
            detail=f"the key must be 1 to {IDEMPOTENCY_KEY_LENGTH_MAX} characters",
        )
    if not key.isascii() or not key.isprintable():
        raise ProblemError(
            "idempotency_key_invalid", detail="the key must be printable ASCII characters"
        )
    return key


def fingerprint(operation: str, path: str, body: Any) -> bytes:
    digest = hashlib.sha256()
    digest.update(operation.encode())
    digest.update(b"\n")
    digest.update(path.encode())
    digest.update(b"\n")
    digest.update(_CANONICAL.encode(body))
    return digest.digest()


def idempotency_of(request: web.Request, *, scope: str, operation: str, body: Any) -> Idempotency:
    key = parse_key(request.headers.get(HEADER))
    return Idempotency(scope=scope, key=key, fingerprint=fingerprint(operation, request.path, body))
