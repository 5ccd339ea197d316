"""Request signatures: the canonical request, signing it, parsing and checking signatures.

One module for both sides, so the gateway, the tests, the benchmark and partners' clients
(see README "Signing requests") cannot disagree about a byte. It knows no HTTP framework.

A signed request carries four headers:

    X-Partner-Id:  the partner's id
    X-Timestamp:   Unix time in whole seconds; refused when more than 300 s from ours
    X-Nonce:       16 to 64 characters of [A-Za-z0-9_-], never reused within the window
    X-Signature:   base64 of HMAC-SHA256(secret, canonical) or, for RSA2 partners, of
                   the SHA256withRSA (PKCS#1 v1.5) signature of canonical

and `canonical` is these lines joined by "\\n" (no trailing newline):

    txengine-v1
    METHOD                       upper case
    /path                        exactly as on the request line, percent-encoding included
    a=1&b=2                      the raw query split on "&", empty parts dropped, sorted
                                 bytewise, joined by "&" (no decoding: nothing to disagree on)
    partner id
    timestamp
    nonce
    Idempotency-Key              the header's value as sent ("" when there is none)
    hex SHA-256 of the body      (of b"" when there is none)

Separate headers rather than one structured `Authorization` header: every HTTP client
can set them, and each can be checked and named in the refusal on its own. The body is
hashed, not included, so the canonical string stays short and a client can hash while
it streams. The version line lets the format change without ambiguity. The
Idempotency-Key is signed because the gateway runs a request's handler while its nonce is
still being checked (gateway/auth.py): a replayed POST must not be able to come back
under a new key and move the money again; with the key signed, a replay can only repeat
the first answer.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import yarl
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

HMAC_SHA256: Final = "hmac-sha256"
RSA2: Final = "rsa2"
ALGORITHMS: Final = (HMAC_SHA256, RSA2)

PARTNER_HEADER: Final = "X-Partner-Id"
TIMESTAMP_HEADER: Final = "X-Timestamp"
NONCE_HEADER: Final = "X-Nonce"
SIGNATURE_HEADER: Final = "X-Signature"
HEADERS: Final = (PARTNER_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)

VERSION_LINE: Final = "txengine-v1"
TIMESTAMP_SKEW_S_MAX: Final = 300
PARTNER_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,63}$"
NONCE_LENGTH_MIN: Final = 16
NONCE_LENGTH_MAX: Final = 64
# Patterns are matched with fullmatch: "$" alone would let a trailing newline through.
# A 4096-bit RSA signature is 512 bytes, 684 in base64; nothing valid is longer.
SIGNATURE_LENGTH_MAX: Final = 1024
RSA_KEY_BITS_MIN: Final = 2048
_PARTNER_ID_RE: Final = re.compile(PARTNER_ID_PATTERN)
_NONCE_RE: Final = re.compile(f"[A-Za-z0-9_-]{{{NONCE_LENGTH_MIN},{NONCE_LENGTH_MAX}}}")
_TIMESTAMP_RE: Final = re.compile(r"[0-9]{1,12}")
_EMPTY_BODY_SHA256: Final = hashlib.sha256(b"").hexdigest()


class SignatureError(Exception):
    """A request's signature headers are missing or wrong; `code` names the check that
    failed (a problem code of the gateway), the message says how, never with a secret."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclasses.dataclass(frozen=True, slots=True)
class SignedHeaders:
    partner_id: str
    timestamp: int
    nonce: str
    signature: bytes


def parse_headers(get: Callable[[str], str | None]) -> SignedHeaders:
    """The four signature headers, read with `get(name)`; SignatureError if any is
    missing or malformed. Checks only form: whether the partner exists, the time is
    fresh and the signature right is for `check_timestamp` and the verifiers."""
    values = [get(name) for name in HEADERS]
    if all(value is None for value in values):
        raise SignatureError("missing_signature", "sign the request: see /openapi.json")
    partner_id, timestamp, nonce, signature = values
    for name, value in zip(HEADERS, values, strict=True):
        if value is None:
            raise SignatureError("missing_signature", f"the {name} header is missing")
    assert partner_id is not None and timestamp is not None
    assert nonce is not None and signature is not None
    if not _PARTNER_ID_RE.fullmatch(partner_id):
        raise SignatureError("unknown_partner", "no such partner")
    if not _TIMESTAMP_RE.fullmatch(timestamp):
        raise SignatureError("malformed_signature", f"{TIMESTAMP_HEADER} must be Unix seconds")
    if not _NONCE_RE.fullmatch(nonce):
        raise SignatureError(
            "malformed_signature",
            f"{NONCE_HEADER} must be {NONCE_LENGTH_MIN} to {NONCE_LENGTH_MAX} of A-Z a-z 0-9 _ -",
        )
    return SignedHeaders(partner_id, int(timestamp), nonce, _decode_signature(signature))


def _decode_signature(text: str) -> bytes:
    if len(text) > SIGNATURE_LENGTH_MAX or not text.isascii():
        raise SignatureError("malformed_signature", f"{SIGNATURE_HEADER} is not base64")
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("malformed_signature", f"{SIGNATURE_HEADER} is not base64") from None
    if not decoded:
        raise SignatureError("malformed_signature", f"{SIGNATURE_HEADER} is empty")
    return decoded


def check_timestamp(timestamp: int, *, now_s: float) -> None:
    if abs(now_s - timestamp) > TIMESTAMP_SKEW_S_MAX:
        raise SignatureError(
            "stale_timestamp",
            f"{TIMESTAMP_HEADER} is more than {TIMESTAMP_SKEW_S_MAX} s from the server's clock",
        )


def canonical_query(raw_query: str) -> str:
    return "&".join(sorted(part for part in raw_query.split("&") if part))


def canonical_request(
    *,
    method: str,
    target: str,
    partner_id: str,
    timestamp: int,
    nonce: str,
    body: bytes,
    idempotency_key: str = "",
) -> bytes:
    """What is signed. `target` is the request line's target: raw path and query."""
    path, _, query = target.partition("?")
    body_sha256 = hashlib.sha256(body).hexdigest() if body else _EMPTY_BODY_SHA256
    lines = (
        VERSION_LINE,
        method.upper(),
        path,
        canonical_query(query),
        partner_id,
        str(timestamp),
        nonce,
        idempotency_key,
        body_sha256,
    )
    return "\n".join(lines).encode("utf-8", "surrogateescape")


# -- verifying ------------------------------------------------------------------------------


def verify_hmac(secrets_: Sequence[bytes], message: bytes, signature: bytes) -> bool:
    """True if `signature` is the HMAC of `message` under any of the partner's current
    secrets (more than one during a rotation's overlap). Every secret is tried, each
    comparison constant-time, so the time taken says nothing about which matched."""
    matched = False
    for secret in secrets_:
        expected = hmac.digest(secret, message, "sha256")
        matched |= hmac.compare_digest(expected, signature)
    return matched


def verify_rsa2(public_keys: Sequence[rsa.RSAPublicKey], message: bytes, signature: bytes) -> bool:
    matched = False
    for key in public_keys:
        try:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        matched = True
    return matched


def load_public_key(pem: str | bytes) -> rsa.RSAPublicKey:
    """An RSA public key from PEM; ValueError if it is not one of at least 2048 bits."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not a PEM public key: {error}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("RSA2 needs an RSA public key")
    if key.key_size < RSA_KEY_BITS_MIN:
        raise ValueError(f"the key has {key.key_size} bits; at least {RSA_KEY_BITS_MIN} needed")
    return key


# -- signing (the client's side) ------------------------------------------------------------


def new_nonce() -> str:
    return secrets.token_urlsafe(18)  # 24 characters, 144 random bits


@dataclasses.dataclass(frozen=True)
class Signer:
    """Signs requests for one partner: `Signer.hmac(id, secret)` or `Signer.rsa2(id, pem)`.

    `headers(method, url, body)` gives the four headers to send. `url` is the request
    target as it goes on the request line ("/v1/accounts?limit=5", percent-encoded) or a
    full URL, whose target is taken as an HTTP client would encode it.
    """

    partner_id: str
    sign: Callable[[bytes], bytes]

    @classmethod
    def hmac(cls, partner_id: str, secret: str) -> Signer:
        key = secret.encode()
        return cls(partner_id, lambda message: hmac.digest(key, message, "sha256"))

    @classmethod
    def rsa2(cls, partner_id: str, private_key_pem: bytes) -> Signer:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey), "RSA2 needs an RSA private key"
        return cls(
            partner_id, lambda message: key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        )

    def headers(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        *,
        timestamp: int | None = None,
        nonce: str | None = None,
        idempotency_key: str = "",
    ) -> dict[str, str]:
        # A target as sent ("/v1/...?..."), or a URL, encoded as an HTTP client sends it.
        target = url if url.startswith("/") else yarl.URL(url).raw_path_qs
        timestamp = int(time.time()) if timestamp is None else timestamp
        nonce = new_nonce() if nonce is None else nonce
        message = canonical_request(
            method=method,
            target=target,
            partner_id=self.partner_id,
            timestamp=timestamp,
            nonce=nonce,
            body=body,
            idempotency_key=idempotency_key,
        )
        return {
            PARTNER_HEADER: self.partner_id,
            TIMESTAMP_HEADER: str(timestamp),
            NONCE_HEADER: nonce,
            SIGNATURE_HEADER: base64.b64encode(self.sign(message)).decode(),
        }


def aiohttp_middleware(signer: Signer) -> Callable[..., Any]:
    """An aiohttp client middleware that signs every request a session sends (retries
    included, each with a fresh nonce): `aiohttp.ClientSession(middlewares=(m,))`."""

    async def sign(request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        body = request.body
        data = b"" if not body else await body.as_bytes()
        key = request.headers.get("Idempotency-Key", "")
        signed = signer.headers(request.method, request.url.raw_path_qs, data, idempotency_key=key)
        request.headers.update(signed)
        return await handler(request)

    return sign
