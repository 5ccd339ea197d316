"""Webhook signatures, in Stripe's scheme.

Every delivery carries `Txengine-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`, each
v1 the HMAC-SHA256 under one of the partner's secrets of the bytes `<t>.<body>`. During
a rotation the old and the new secret both sign, so a receiver holding either accepts
the delivery. A receiver checks that one v1 matches (in constant time) and that t is at
most `TOLERANCE_S` old, which bounds the replay of a captured delivery.

`verify` uses the standard library only: partners may copy it (README shows it).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Sequence
from typing import Final

HEADER: Final = "Txengine-Signature"
SCHEME: Final = "v1"
TOLERANCE_S: Final = 300  # receivers reject signatures older than this
SIGNATURES_MAX: Final = 8  # v1 values a receiver reads from one header


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `<timestamp>.<body>` under `secret`."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """The header value signing `body` at `timestamp` with every secret in `secrets`."""
    assert secrets, "a delivery is never sent unsigned"
    return ",".join([f"t={timestamp}", *(f"{SCHEME}={sign(s, timestamp, body)}" for s in secrets)])


def verify(
    header: str,
    body: bytes,
    secrets: Iterable[str],
    *,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> bool:
    """True if `header` signs `body` with one of `secrets` and is at most `tolerance_s` old.

    `body` must be the raw bytes received, before any JSON parsing.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif key == SCHEME and len(signatures) < SIGNATURES_MAX:
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    for secret in secrets:
        expected = sign(secret, timestamp, body)
        if any(hmac.compare_digest(expected, given) for given in signatures):
            return True
    return False
