"""The one HTTP client of the fault suite.

Every request the workload, the checker and the nemesis's probes send goes through
`Client.request`, so that whatever every request must carry (the partner's request
signature, Idempotency-Key included) is added in one place: `Client._headers`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, Final

import aiohttp

from gateway.signing import Signer

# Problems that mean "not decided yet: send the same request again with the same key".
RETRY_CODES: Final = frozenset(
    {"idempotency_key_in_flight", "overloaded", "unavailable", "conflict", "outcome_unknown"}
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
    """An aiohttp session against one base URL. Open with `async with Client(url)`.
    `partner` (id, HMAC secret) signs every request, as /v1 wants."""

    def __init__(
        self,
        base_url: str,
        *,
        partner: tuple[str, str] | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url
        self._signer = None if partner is None else Signer.hmac(*partner)
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
        """The headers of one request, signed: the signature covers the method, path,
        exact body bytes and the Idempotency-Key. A fresh nonce each time, so a retry
        with the same key is a new signed request."""
        headers = {}
        if body:
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        if self._signer is not None:
            headers.update(self._signer.headers(method, path, body, idempotency_key=key or ""))
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
