"""/v1/accounts: open accounts, read their balances and their history."""

from __future__ import annotations

import logging
from typing import Final

import orjson
from aiohttp import web

from engine import CreateAccount, EngineError, InvalidCursor, Result, audit
from engine.store import ENTRIES_PAGE_LIMIT_MAX
from gateway.commands import ENGINE, caller_scope, submit
from gateway.idempotency import REPLAYED_HEADER
from gateway.problems import ProblemError
from gateway.routes._request import page_cursor, page_limit, path_id, read_body
from gateway.schemas import (
    AccountCreate,
    account_json,
    check_account_create,
    encode,
    page_json,
)

ENTRIES_PAGE_LIMIT_DEFAULT: Final = 20
_log = logging.getLogger("txengine.gateway")
routes = web.RouteTableDef()


def _render(result: Result) -> dict[str, object]:
    assert result.account is not None
    return account_json(result.account)


@routes.post("/v1/accounts")
async def create_account(request: web.Request) -> web.Response:
    body = await read_body(request, AccountCreate)
    check_account_create(body)
    command = CreateAccount(
        currency=body.currency,
        kind=body.kind,
        metadata=body.metadata,
        scope=caller_scope(request),
    )
    response = await submit(
        request, command, operation="create_account", body=body, render=_render, status=201
    )
    if response.status == 201 and REPLAYED_HEADER not in response.headers:
        await _audit_opened(request, response)
    return response


async def _audit_opened(request: web.Request, response: web.Response) -> None:
    """Record the opening in the audit log. After the fact, not in the engine's batch
    (which knows nothing of partners): if the write fails the account exists unaudited,
    and the failure is logged; the partner's answer is not held back for it."""
    assert isinstance(response.body, bytes)
    account = orjson.loads(response.body)
    scope = caller_scope(request)
    try:
        async with request.app[ENGINE].reader() as conn:
            await audit.append(
                conn,
                actor=f"partner:{scope}",
                action="account.opened",
                subject=account["id"],
                details={"kind": account["kind"], "currency": account["currency"]},
            )
    except EngineError as error:
        _log.warning("audit entry not written: %s", error, extra={"account": account["id"]})


def _account_id(request: web.Request) -> int:
    return path_id(request, "account_id", not_found="account_not_found")


@routes.get("/v1/accounts/{account_id}")
async def get_account(request: web.Request) -> web.Response:
    account_id = _account_id(request)
    account = await request.app[ENGINE].account(account_id, scope=caller_scope(request))
    if account is None:
        raise ProblemError("account_not_found", detail=f"no account {account_id}")
    return web.Response(body=encode(account_json(account)), content_type="application/json")


@routes.get("/v1/accounts/{account_id}/entries")
async def list_entries(request: web.Request) -> web.Response:
    account_id = _account_id(request)
    limit = page_limit(request, default=ENTRIES_PAGE_LIMIT_DEFAULT, maximum=ENTRIES_PAGE_LIMIT_MAX)
    cursor = page_cursor(request)
    try:
        page = await request.app[ENGINE].entries(
            account_id, scope=caller_scope(request), limit=limit, starting_after=cursor
        )
    except InvalidCursor as error:
        raise ProblemError("invalid_cursor", detail=str(error)) from None
    if page is None:
        raise ProblemError("account_not_found", detail=f"no account {account_id}")
    return web.Response(body=encode(page_json(page)), content_type="application/json")


ROUTES: Final = list(routes)
