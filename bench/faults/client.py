"""The one HTTP client of the fault suite.

Every request the workload, the checker and the nemesis's probes send goes through
`Client.request`, so that whatever every request must carry is added in one place,
`Client._headers`: there every request is signed as the run's partner
(gateway/signing.py), its Idempotency-Key included, with a fresh nonce per attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, Final

import aiohttp

from gateway.signing import Signer

# Problems that mean "not decided yet: send the same request again with the same key".
# `rate_limited` is a partner's budget (the run's partner has one it never meets, but a
# budget lease needs the database, so a fault can make it answer late). `replayed_nonce`
# on a nonce used once is what a partner sees if the nonce's first claim committed but its
# answer was lost to a fault (the gateway withholds the answer, not the effect): sending
# the same request again with the same key and a new nonce is the reliable way on, and
# the checker still proves the effect happened at most once.
RETRY_CODES: Final = frozenset(
    {
        "idempotency_key_in_flight",
        "overloaded",
        "unavailable",
        "conflict",
        "outcome_unknown",
        "rate_limited",
        "replayed_nonce",
    }
)
# Longer than anything the gateway waits for inside (statement timeout 5 s, connect
# timeout 5 s, one batch retry), so a timeout here means a hung server, not a slow one.
REQUEST_TIMEOUT_S: Final = 30.0
CONNECTION_ERRORS: Final = (aiohttp.ClientError, TimeoutError, ConnectionError, OSError)
CONNECTIONS_MAX: Final = 256


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer. `status` 0 means none came (connection error, timeout, dropped)."""

    status: int
    body: bytes = b""
    replayed: bool = False
    error: str = ""  # why no answer came

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        """The problem code of an error answer, None for a success or no answer."""
        if self.status < 400:
            return None
        try:
            code = self.json().get("code")
        except (ValueError, AttributeError):
            return "not_a_problem_document"
        return code if isinstance(code, str) else None

    @property
    def definite(self) -> bool:
        """True when the answer says for sure whether the request took effect."""
        return 200 <= self.status < 500 and self.code not in RETRY_CODES


class Client:
    """An aiohttp session against one base URL. Open with `async with Client(url, signer=...)`."""

    def __init__(
        self, base_url: str, *, signer: Signer | None, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.base_url = base_url
        self.signer = signer  # None: unsigned (only the open routes then answer)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(limit=CONNECTIONS_MAX)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()
        self._session = None

    def _headers(self, method: str, path: str, body: bytes, key: str | None) -> dict[str, str]:
        """The headers of one request, signed: the signature covers the method, the path,
        the exact body bytes and the Idempotency-Key sent, and each call (each attempt)
        takes a new nonce."""
        headers = {}
        if body:
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        if self.signer is not None:
            signed = self.signer.headers(method, path, body, idempotency_key=key or "")
            headers.update(signed)
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        key: str | None = None,
        drop_after_s: float | None = None,
        timeout_s: float | None = None,
    ) -> Answer:
        """Send one request and read its answer; never raises for the network.

        `drop_after_s` closes the connection that long after sending, if no answer came
        by then: the client that gave up, whose request the server may still apply.
        """
        assert self._session is not None, "use `async with Client(...)`"
        data = json.dumps(body).encode() if body is not None else b""
        headers = self._headers(method, path, data, key)
        options: dict[str, Any] = {}
        if timeout_s is not None:
            options["timeout"] = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with asyncio.timeout(drop_after_s):
                async with self._session.request(
                    method, self.base_url + path, data=data or None, headers=headers, **options
                ) as response:
                    payload = await response.read()
                    replayed = response.headers.get("Idempotent-Replayed") == "true"
                    return Answer(status=response.status, body=payload, replayed=replayed)
        except TimeoutError:
            why = "dropped by the client" if drop_after_s is not None else "timed out"
            return Answer(status=0, error=why)
        except CONNECTION_ERRORS as error:
            return Answer(status=0, error=repr(error))
