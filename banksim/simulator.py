"""The simulated banks: orders in, signed callbacks out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import random
import time
from typing import Any, Final

import aiohttp
from aiohttp import web

CHANNELS: Final = ("ebank", "card", "postal", "cash")
SIGNATURE_HEADER: Final = "Bank-Signature"
SIGNATURE_TOLERANCE_S: Final = 300
_log = logging.getLogger("banksim")


def dev_secrets() -> dict[str, str]:
    """The secrets txengine embeds for development (gateway/settings.py)."""
    return {name: f"txengine-dev-secret-{name}" for name in CHANNELS}


class Fate(enum.StrEnum):
    SUCCEED = "succeeded"  # call back "succeeded" after the latency
    FAIL = "failed"  # call back "failed" after the latency
    SILENCE = "silence"  # never call back


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimConfig:
    secrets: dict[str, str] = dataclasses.field(default_factory=dev_secrets, repr=False)
    latency_ms: float = 50.0  # from accepting an order to calling back
    failure_rate: float = 0.0  # share of answered orders that fail
    silence_rate: float = 0.0  # share of orders never answered
    duplicate_rate: float = 0.0  # share of callbacks sent twice (banks do)
    callback_attempts_max: int = 5  # per callback, while txengine is away or answers 5xx
    callback_retry_s: float = 0.5  # doubled after each failed attempt
    callback_timeout_s: float = 5.0
    orders_max: int = 1_000_000  # orders remembered; beyond it new ones get 503
    seed: int | None = None

    def __post_init__(self) -> None:
        for rate in (self.failure_rate, self.silence_rate, self.duplicate_rate):
            assert 0.0 <= rate <= 1.0, rate
        assert 0 <= self.latency_ms <= 3_600_000
        assert 1 <= self.callback_attempts_max <= 20
        assert self.orders_max >= 1


@dataclasses.dataclass(kw_only=True)
class Order:
    channel: str
    request_id: str
    operation: str  # "collect" or "pay"
    amount_minor: int
    currency: str
    callback_url: str
    fate: Fate
    bank_reference: str
    callbacks: list[int] = dataclasses.field(default_factory=list)  # statuses txengine gave


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def _verified(secret: str, header: str | None, body: bytes) -> bool:
    if header is None:
        return False
    fields = dict(part.strip().partition("=")[::2] for part in header.split(",")[:8])
    timestamp, given = fields.get("t", ""), fields.get("v1", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > SIGNATURE_TOLERANCE_S:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), f"t={timestamp},v1={given}")


class BankSimulator:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.orders: dict[tuple[str, str], Order] = {}
        self.stats: dict[str, int] = {
            "orders": 0, "repeats": 0, "refused": 0, "callbacks": 0, "callback_errors": 0,
        }  # fmt: skip
        self._random = random.Random(self.config.seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/v1/{channel}/{operation:collect|pay}", self._accept)
        app.router.add_get("/v1/orders/{channel}/{request_id}", self._show)
        app.router.add_get("/healthz", self._health)
        return app

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0: any free port); return the base URL."""
        timeout = aiohttp.ClientTimeout(total=self.config.callback_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        bound_port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def idle(self, timeout_s: float = 10.0) -> None:
        """Wait until every scheduled callback has been sent (or given up)."""
        async with asyncio.timeout(timeout_s):
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- orders -----------------------------------------------------------------------------

    async def _accept(self, request: web.Request) -> web.Response:
        channel, operation = request.match_info["channel"], request.match_info["operation"]
        secret = self.config.secrets.get(channel)
        if secret is None:
            return web.json_response({"error": "unknown channel"}, status=404)
        body = await request.read()
        if not _verified(secret, request.headers.get(SIGNATURE_HEADER), body):
            self.stats["refused"] += 1
            return web.json_response({"error": "bad signature"}, status=401)
        try:
            data = json.loads(body)
            key = (channel, str(data["request_id"]))
            known = self.orders.get(key)
            if known is not None:
                self.stats["repeats"] += 1
            else:
                known = self._order(channel, operation, data)
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "malformed order"}, status=400)
        if known is None:
            return web.json_response({"error": "too many orders"}, status=503)
        return web.json_response({"bank_reference": known.bank_reference}, status=202)

    def _order(self, channel: str, operation: str, data: dict[str, Any]) -> Order | None:
        if len(self.orders) >= self.config.orders_max:
            return None
        draw = self._random.random()
        if draw < self.config.silence_rate:
            fate = Fate.SILENCE
        elif self._random.random() < self.config.failure_rate:
            fate = Fate.FAIL
        else:
            fate = Fate.SUCCEED
        self.stats["orders"] += 1
        order = Order(
            channel=channel,
            request_id=str(data["request_id"]),
            operation=operation,
            amount_minor=int(data["amount_minor"]),
            currency=str(data["currency"]),
            callback_url=str(data["callback_url"]),
            fate=fate,
            bank_reference=f"{channel.upper()}-{self.stats['orders']:08d}",
        )
        self.orders[(channel, order.request_id)] = order
        if fate is not Fate.SILENCE:
            twice = self._random.random() < self.config.duplicate_rate
            self._spawn(self._answer_later(order, repeats=2 if twice else 1))
        return order

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_later(self, order: Order, *, repeats: int) -> None:
        await asyncio.sleep(self.config.latency_ms / 1000)
        for _ in range(repeats):
            await self.callback(order, status=order.fate.value)

    # -- callbacks --------------------------------------------------------------------------

    def callback_body(self, order: Order, *, status: str, reason: str = "") -> bytes:
        body = {
            "request_id": order.request_id,
            "status": status,
            "amount_minor": order.amount_minor,
            "currency": order.currency,
            "bank_reference": order.bank_reference,
            "reason": reason or ("declined by the simulated bank" if status == "failed" else ""),
        }
        return json.dumps(body).encode()

    async def callback(
        self,
        order: Order,
        *,
        status: str,
        secret: str | None = None,
        timestamp: int | None = None,
        body: bytes | None = None,
    ) -> int:
        """Call txengine back about `order` now, retrying while it is away or answers 5xx;
        return the last HTTP status (0: never reached). The keyword arguments let a test
        forge a callback: another secret, an old timestamp, a changed body."""
        assert self._session is not None, "start() first"
        body = body if body is not None else self.callback_body(order, status=status)
        secret = secret if secret is not None else self.config.secrets[order.channel]
        backoff_s, last = self.config.callback_retry_s, 0
        for attempt in range(self.config.callback_attempts_max):
            signed_at = timestamp if timestamp is not None else int(time.time())
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(secret, signed_at, body),
            }
            try:
                async with self._session.post(
                    order.callback_url, data=body, headers=headers
                ) as response:
                    last = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                _log.info("callback failed", extra={"attempt": attempt, "error": repr(exc)})
                last = 0
            self.stats["callbacks"] += 1
            if 0 < last < 500:  # answered: 2xx done; 4xx is final, retrying will not help
                break
            self.stats["callback_errors"] += 1
            await asyncio.sleep(backoff_s)
            backoff_s *= 2
        order.callbacks.append(last)
        return last

    async def _show(self, request: web.Request) -> web.Response:
        order = self.orders.get((request.match_info["channel"], request.match_info["request_id"]))
        if order is None:
            return web.json_response({"error": "no such order"}, status=404)
        view = dataclasses.asdict(order)
        view["fate"] = order.fate.value
        return web.json_response(view)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.stats})
