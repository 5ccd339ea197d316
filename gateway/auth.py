"""Partner authentication of every /v1 request: signature, freshness, replay, rate.

The checks run cheapest first, and nothing is recorded until the signature is proven,
so a forger cannot spend a partner's rate budget or burn its nonces:

1. the four signature headers are present and well formed   401 missing_signature,
                                                             malformed_signature
2. the timestamp is within 300 s of ours                     401 stale_timestamp
3. the partner exists and is active                          401 unknown_partner,
                                                             partner_disabled
4. the body arrives in time (and within the size limit)      408 request_timeout, 413
5. the signature matches a live credential (constant time)   401 bad_signature
6. the partner's rate budget has a token                     429 rate_limited, Retry-After
7. the nonce was not seen in the window (shared table)       401 replayed_nonce

Then the request runs with the partner's id as its scope, so it sees only what the
partner created. Check 7 runs beside the request, and its answer is withheld until the
check passed (see `auth_middleware` for why that is safe).

/healthz, /readyz, /metrics, /openapi.json and /problems/* need no signature: they show
nothing of any partner.

Partners' credentials are cached per process for CREDENTIALS_TTL_S, so a request costs no
database read for them; disabling or rotating takes effect within that time.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from engine import Engine, EngineError
from engine import partners as partner_store
from engine.nonces import RETENTION_S, NonceBook
from engine.partners import Credentials, Lease, PartnerStatus, SecretBox
from gateway import metrics, signing
from gateway.commands import SCOPE, problem_code_of
from gateway.idempotency import HEADER as IDEMPOTENCY_HEADER
from gateway.problems import ProblemError
from gateway.ratelimit import RateBudget
from gateway.signing import SignatureError

PROTECTED_PREFIX: Final = "/v1"
CREDENTIALS_TTL_S: Final = 1.0
CACHE_SIZE_MAX: Final = 10_000
assert RETENTION_S >= 2 * signing.TIMESTAMP_SKEW_S_MAX

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Partner:
    """A partner's cached credentials, ready to verify with."""

    __slots__ = ("credentials", "expires_at", "public_keys")

    def __init__(self, credentials: Credentials, expires_at: float) -> None:
        self.credentials = credentials
        self.expires_at = expires_at
        self.public_keys: tuple[rsa.RSAPublicKey, ...] = tuple(
            signing.load_public_key(pem) for pem in credentials.public_keys_pem
        )

    def verify(self, message: bytes, signature: bytes) -> bool:
        if self.credentials.algorithm == signing.RSA2:
            return signing.verify_rsa2(self.public_keys, message, signature)
        return signing.verify_hmac(self.credentials.secrets, message, signature)


class Authenticator:
    def __init__(
        self,
        engine: Engine,
        box: SecretBox,
        *,
        body_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._box = box
        self._body_timeout_s = body_timeout_s
        self._clock = clock
        self.nonces = NonceBook(engine.dsn)
        self._cache: dict[str, tuple[float, _Partner | None]] = {}
        self._loading: dict[str, asyncio.Future[_Partner | None]] = {}
        self._budgets: dict[str, RateBudget] = {}

    async def authenticate(self, request: web.Request) -> tuple[str, asyncio.Future[bool]]:
        """The id of the partner that signed `request`, and the nonce check under way
        (True: fresh); ProblemError if the request is refused."""
        try:
            headers = signing.parse_headers(request.headers.get)
            signing.check_timestamp(headers.timestamp, now_s=self._clock())
        except SignatureError as error:
            raise _refused(error.code, error.detail) from None
        partner = await self._partner(headers.partner_id)
        if partner is None:
            raise _refused("unknown_partner", "no such partner")
        if partner.credentials.status is not PartnerStatus.ACTIVE:
            raise _refused("partner_disabled", "this partner is disabled")
        body = await self._read_body(request)
        message = signing.canonical_request(
            method=request.method,
            target=request.raw_path,
            partner_id=headers.partner_id,
            timestamp=headers.timestamp,
            nonce=headers.nonce,
            idempotency_key=request.headers.get(IDEMPOTENCY_HEADER, ""),
            body=body,
        )
        if not partner.verify(message, headers.signature):
            raise _refused("bad_signature", "the signature does not match the request")
        await self._spend(headers.partner_id, partner.credentials.rate_per_s)
        try:
            claim = self.nonces.claim(headers.partner_id, headers.nonce)
        except EngineError as error:
            raise ProblemError(problem_code_of(error), detail=str(error)) from None
        claim.add_done_callback(_retrieve)  # a handler cancelled mid-way never awaits it
        return headers.partner_id, claim

    async def _read_body(self, request: web.Request) -> bytes:
        # aiohttp keeps what it read, so the handler's own read() returns the same bytes.
        if request.content.is_eof():  # all of it came with the headers: nothing to bound
            return await request.read()
        try:
            async with asyncio.timeout(self._body_timeout_s):
                return await request.read()
        except TimeoutError:
            raise ProblemError(
                "request_timeout", detail=f"the body did not arrive in {self._body_timeout_s} s"
            ) from None

    async def _spend(self, partner_id: str, rate_per_s: int) -> None:
        budget = self._budgets.get(partner_id)
        if budget is None:
            if len(self._budgets) >= CACHE_SIZE_MAX:
                self._budgets.clear()
            budget = self._budgets[partner_id] = RateBudget(self._leaser(partner_id))
        try:
            wait_s = await budget.take(rate_per_s=rate_per_s)
        except EngineError as error:
            raise ProblemError(problem_code_of(error), detail=str(error)) from None
        if wait_s is not None:
            metrics.AUTH_REFUSALS.labels("rate_limited").inc()
            retry_after_s = max(1, math.ceil(wait_s))
            raise ProblemError(
                "rate_limited",
                detail="this partner's request rate is over its limit",
                headers={"Retry-After": str(retry_after_s)},
            )

    def _leaser(self, partner_id: str) -> Callable[[int], Awaitable[Lease]]:
        async def lease(chunk: int) -> Lease:
            async with self._engine.reader() as conn:
                return await partner_store.lease_tokens(conn, partner_id, want=chunk)

        return lease

    async def _partner(self, partner_id: str) -> _Partner | None:
        cached = self._cache.get(partner_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        loading = self._loading.get(partner_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(partner_id))
            self._loading[partner_id] = loading
        return await asyncio.shield(loading)

    async def _load(self, partner_id: str) -> _Partner | None:
        try:
            async with self._engine.reader() as conn:
                found = await partner_store.credentials(conn, self._box, partner_id)
        except EngineError as error:
            raise ProblemError(problem_code_of(error), detail=str(error)) from None
        finally:
            self._loading.pop(partner_id, None)
        expires_at = time.monotonic() + CREDENTIALS_TTL_S
        partner = None if found is None else _Partner(found, expires_at)
        if len(self._cache) >= CACHE_SIZE_MAX:
            self._cache.clear()
        self._cache[partner_id] = (expires_at, partner)
        return partner


def _retrieve(claim: asyncio.Future[bool]) -> None:
    if not claim.cancelled():
        claim.exception()


async def _fresh(claim: asyncio.Future[bool]) -> bool:
    try:
        return await claim
    except EngineError as error:
        raise ProblemError(problem_code_of(error), detail=str(error)) from None


def _refused(code: str, detail: str) -> ProblemError:
    metrics.AUTH_REFUSALS.labels(code).inc()
    return ProblemError(code, detail=detail)


# Routes under /v1 that banks, not partners, call: each checks its own signature (the
# channel's shared secret, engine/products/banks.py) before it reads anything.
_BANK_CALLBACK_RE: Final = re.compile(r"^/v1/channels/[a-z]{1,16}/callbacks$")


def is_protected(path: str) -> bool:
    if _BANK_CALLBACK_RE.match(path):
        return False
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


def auth_middleware(authenticator: Authenticator) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_protected(request.path):
            return await handler(request)
        request[SCOPE], claim = await authenticator.authenticate(request)
        # The nonce check (a database round trip, batched) runs beside the handler rather
        # than before it, which keeps it off the latency of every request. That is safe
        # because nothing of the handler's gets out before the check passed: a replay's
        # answer, error or not, is replaced by the 401; and what a replayed request did
        # is nothing, as every state-changing request carries an Idempotency-Key, which
        # the engine applies once (a replay is the same request with the same key: it
        # is answered from the record, or refused while the first is in flight).
        try:
            response = await handler(request)
        except Exception:  # an error answer is an answer too: withheld from a replay
            if not await _fresh(claim):
                raise _refused("replayed_nonce", "this nonce was used before") from None
            raise
        if not await _fresh(claim):
            raise _refused("replayed_nonce", "this nonce was used before")
        return response

    return auth
