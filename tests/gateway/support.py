"""What every HTTP test needs: a served app on a real engine, a client that speaks
its conventions, and checks of replies against the OpenAPI document."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

import asyncpg
import jsonschema
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from engine import Engine, risk_settings
from engine import partners as partner_store
from engine.engine import utc_now
from engine.partners import SecretBox
from gateway import metrics
from gateway.app import make_app, runner_options
from gateway.openapi import document
from gateway.problems import PROBLEM_TYPES
from gateway.settings import from_env
from gateway.signing import Signer
from tests.conftest import TEST_ENGINE_CONFIG, with_database

BODY_SIZE_MAX: Final = 16 * 1024
UNKNOWN_ID: Final = "12345"  # ids carry a timestamp, so no id this small is ever issued
AUTO: Final = object()  # a fresh Idempotency-Key
_DOCUMENT_URI: Final = "urn:txengine:openapi"
# One master key per test run; every served app and every partner made in tests use it.
TEST_SECRET_KEY: Final = Fernet.generate_key().decode()
DEFAULT_PARTNER: Final = "test-partner"
# High enough that no test but the rate-limit ones ever meets it.
TEST_RATE_PER_S: Final = 1_000_000


@dataclasses.dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return str(self.headers.get("Content-Type", "")).split(";")[0].strip()


async def add_partner(
    engine: Engine,
    partner_id: str,
    *,
    rate_per_s: int = TEST_RATE_PER_S,
    burst: int = TEST_RATE_PER_S,
) -> Signer:
    """Create an HMAC partner in the engine's database and return its signer."""
    async with engine.pool.acquire() as conn:
        secret = await partner_store.create(
            conn,
            SecretBox(TEST_SECRET_KEY.encode()),
            partner_id=partner_id,
            name=partner_id,
            actor="operator:tests",
            rate_per_s=rate_per_s,
            burst=burst,
        )
    assert secret is not None
    return Signer.hmac(partner_id, secret)


@dataclasses.dataclass
class Api:
    """A client of the served app that signs every request as `signer`'s partner."""

    client: TestClient
    engine: Engine
    signer: Signer

    def as_partner(self, signer: Signer) -> Api:
        return dataclasses.replace(self, signer=signer)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        key: Any = AUTO,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        sign: bool = True,
    ) -> Reply:
        """Send a request, signed unless `sign` is false; `headers` are sent as given and
        override the signature's (to test forgeries)."""
        sent: dict[str, str] = {}
        if key is AUTO:
            key = uuid.uuid4().hex
        if key is not None and method == "POST":
            sent["Idempotency-Key"] = key
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            sent["Content-Type"] = content_type
        if sign:
            target = self.client.make_url(path).raw_path_qs
            signed_key = sent.get("Idempotency-Key", "")
            sent.update(
                self.signer.headers(method, target, data or b"", idempotency_key=signed_key)
            )
        sent.update(headers or {})
        async with self.client.request(method, path, data=data, headers=sent) as response:
            return Reply(response.status, response.headers, await response.read())

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return await self.call("POST", path, body, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.call("GET", path, **kwargs)

    async def open_account(self, kind: str = "user", currency: str = "CNY") -> str:
        reply = await self.post("/v1/accounts", {"currency": currency, "kind": kind})
        assert reply.status == 201, reply
        account_id: str = reply.json["id"]
        return account_id

    async def move(self, debit: str, credit: str, amount: int, **fields: Any) -> Reply:
        body = {
            "debit_account_id": debit,
            "credit_account_id": credit,
            "amount_minor": amount,
            "currency": "CNY",
            **fields,
        }
        return await self.post("/v1/transfers", body)

    async def balance(self, account_id: str) -> dict[str, int]:
        reply = await self.get(f"/v1/accounts/{account_id}")
        assert reply.status == 200, reply
        balance: dict[str, int] = reply.json["balance"]
        return balance

    async def set_account_rules(self, account_id: str, **limits: int | None) -> None:
        """Risk overrides of one account, as `txengine risk set --account` sets them."""
        async with self.engine.pool.acquire() as conn:
            assert await risk_settings.set_account_rules(conn, int(account_id), limits)

    async def freeze(self, account_id: str, *, frozen: bool = True) -> None:
        async with self.engine.pool.acquire() as conn:
            assert await risk_settings.set_frozen(conn, int(account_id), frozen=frozen)

    async def step_up_code(self, step_up_id: str) -> str:
        """The code the payer got by (simulated) SMS, read from the outbox."""
        async with self.engine.pool.acquire() as conn:
            message = await conn.fetchval(
                "SELECT message FROM step_up_outbox WHERE challenge_id = $1", int(step_up_id)
            )
        assert message is not None, step_up_id
        match = re.search(r"code is ([0-9]{6})\.", message)
        assert match is not None, message
        return match[1]

    async def refusals(self, account_id: str | None = None) -> list[dict[str, Any]]:
        async with self.engine.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT account_id, code, reason, amount_minor, scope, idempotency_key
                   FROM risk_refusals WHERE $1::bigint IS NULL OR account_id = $1 ORDER BY id""",
                None if account_id is None else int(account_id),
            )
        return [dict(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        async with self.engine.pool.acquire() as conn:
            row = await conn.fetchrow(
                """SELECT (SELECT count(*) FROM accounts) AS accounts,
                          (SELECT count(*) FROM transfers) AS transfers,
                          (SELECT count(*) FROM entries) AS entries,
                          (SELECT count(*) FROM idempotency_keys) AS keys"""
            )
        return dict(row)


@dataclasses.dataclass
class World:
    bank: str
    user: str  # holds 10_000 CNY
    merchant: str
    dollars: str  # a USD user account

    def transfer(self, **changes: Any) -> dict[str, Any]:
        body = {
            "debit_account_id": self.user,
            "credit_account_id": self.merchant,
            "amount_minor": 100,
            "currency": "CNY",
        }
        body.update(changes)
        return body


@contextlib.asynccontextmanager
async def serving(
    dsn: str,
    *,
    clock: Callable[[], datetime] | None = None,
    port: int = 0,
    **settings_changes: Any,
) -> AsyncIterator[Api]:
    """A served app on `dsn`, and a client signing as the default test partner (made if
    this database has none yet, so several apps can serve one database); `clock` drives
    the engine's time (default: the wall's); `port` 0 is any free one."""
    engine = await Engine.open(
        dsn, config=TEST_ENGINE_CONFIG, observer=metrics.EngineMetrics(), clock=clock or utc_now
    )
    settings = dataclasses.replace(
        from_env(),
        access_log=False,
        body_size_max_bytes=BODY_SIZE_MAX,
        secret_key=TEST_SECRET_KEY,
        **settings_changes,
    )
    server = TestServer(make_app(engine, settings), port=port)
    # TestServer passes server options on from start_server only; TestClient's own
    # start_server then finds it started.
    await server.start_server(**runner_options(settings))
    client = TestClient(server)
    await client.start_server()
    try:
        yield Api(client, engine, await default_signer(engine))
    finally:
        await client.close()
        await engine.close()


async def default_signer(engine: Engine) -> Signer:
    async with engine.pool.acquire() as conn:
        sealed = await conn.fetchval(
            "SELECT secret_sealed FROM partner_credentials WHERE partner_id = $1 AND version = 1",
            DEFAULT_PARTNER,
        )
    if sealed is None:
        return await add_partner(engine, DEFAULT_PARTNER)
    secret = SecretBox(TEST_SECRET_KEY.encode()).open(sealed).decode()
    return Signer.hmac(DEFAULT_PARTNER, secret)


async def make_world(api: Api) -> World:
    bank = await api.open_account("system")
    user = await api.open_account("user")
    merchant = await api.open_account("merchant")
    dollars = await api.open_account("user", "USD")
    assert (await api.move(bank, user, 10_000)).status == 201
    return World(bank=bank, user=user, merchant=merchant, dollars=dollars)


@pytest.fixture
async def api(dsn: str) -> AsyncIterator[Api]:
    async with serving(dsn) as served:
        yield served


@pytest.fixture
async def world(api: Api) -> World:
    return await make_world(api)


@pytest.fixture(scope="module")
async def shared(server_dsn: str, template_dsn: str) -> AsyncIterator[tuple[Api, World]]:
    """One server and world for the many tests of refused requests, which write nothing
    but the refusals' idempotency records (and check that they do not)."""
    name = f"test_api_shared_{os.getpid()}"
    template = urlsplit(template_dsn).path.lstrip("/")
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    async with serving(with_database(server_dsn, name)) as served:
        yield served, await make_world(served)


async def snapshot(api: Api, world: World) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    state: dict[str, Any] = await api.counts()
    for name in ("bank", "user", "merchant", "dollars"):
        account_id = getattr(world, name)
        state[name] = (await api.get(f"/v1/accounts/{account_id}")).json
        state[f"{name}_entries"] = (await api.get(f"/v1/accounts/{account_id}/entries")).json
    return state


# -- the OpenAPI document, for validating responses -----------------------------------------

DOCUMENT: Final = json.loads(json.dumps(document()))
_REGISTRY: Final = Registry().with_resource(
    _DOCUMENT_URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
)


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def validate_against(pointer: str, instance: Any) -> None:
    """Validate `instance` against the schema at `pointer` in the OpenAPI document."""
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{_DOCUMENT_URI}#/{pointer}"},
        registry=_REGISTRY,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    validator.validate(instance)


def validate_response(method: str, template: str, reply: Reply) -> None:
    """The reply is one the document describes for this operation, in status and schema."""
    responses = DOCUMENT["paths"][template][method.lower()]["responses"]
    status = str(reply.status) if str(reply.status) in responses else "default"
    assert status in responses, (method, template, reply.status)
    content = responses[status]["content"]
    assert reply.content_type in content, (method, template, reply.content_type)
    if reply.content_type.endswith("json"):
        pointer = _pointer(
            "paths", template, method.lower(), "responses", status, "content",
            reply.content_type, "schema",
        )  # fmt: skip
        validate_against(pointer, reply.json)


def validate_request(template: str, body: Any) -> None:
    pointer = _pointer("paths", template, "post", "requestBody", "content", "application/json")
    validate_against(pointer + "/schema", body)


def assert_problem(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.content_type == "application/problem+json", reply.headers
    body: dict[str, Any] = reply.json
    assert body["code"] == code, body
    assert body["type"] == f"/problems/{code}"
    assert body["status"] == reply.status
    assert isinstance(body["title"], str) and body["title"]
    assert body["title"] == PROBLEM_TYPES[code].title
    validate_against("components/schemas/Problem", body)
    assert reply.headers.get("X-Request-Id")
    return body


# -- happy paths ---------------------------------------------------------------------------
