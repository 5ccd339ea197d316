"""/v1/accounts/{account_id}/statements/{date}: a day's statement (对账单) as CSV.

The day is a UTC date, `YYYY-MM-DD`; ask for CSV with `Accept: text/csv` or a `.csv`
suffix on the date. One line per movement of the posted balance (engine.products.
statements), streamed as it is read, so a day of many lines never sits in memory whole.
Amounts are integers in minor units, like the rest of the API.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import Sequence
from datetime import date
from typing import Final

from aiohttp import web

from engine import EngineError
from engine.products.statements import StatementLine, open_statement
from gateway.commands import ENGINE, REQUEST_ID, caller_scope
from gateway.problems import ProblemError
from gateway.routes._request import path_id
from gateway.schemas import invalid

CSV_CONTENT_TYPE: Final = "text/csv"
STREAM_S_MAX: Final = 300.0  # a download slower than this is cut (it holds a connection)
# Downloads at once per process: each holds a read connection for its whole stream, and
# reads of balances must keep the rest of the pool.
STREAMS_CONCURRENT_MAX: Final = 2
COLUMNS: Final = (
    "created_at",
    "entry_id",
    "transfer_id",
    "kind",
    "counterparty_account_id",
    "currency",
    "posted_delta_minor",
    "posted_after_minor",
    "out_trade_no",
    "metadata",
)
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")
_ACCEPTED: Final = frozenset({"text/csv", "text/*", "*/*"})
_log = logging.getLogger("txengine.gateway")
routes = web.RouteTableDef()
STREAM_SLOTS: Final = asyncio.Semaphore(STREAMS_CONCURRENT_MAX)  # never waited on


def _day(request: web.Request) -> tuple[date, bool]:
    """The statement's day, and whether the path asked for CSV by its suffix."""
    text = request.match_info["date"]
    suffixed = text.endswith(".csv")
    text = text.removesuffix(".csv")
    try:
        if len(text) != 10:
            raise ValueError(text)
        return date.fromisoformat(text), suffixed
    except ValueError:
        raise invalid("date", f"{text!r} is not a date: write YYYY-MM-DD (UTC)") from None


def _accepts_csv(request: web.Request) -> bool:
    accept = request.headers.get("Accept")
    if not accept:
        return True
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(types & _ACCEPTED)


def _text(value: str | None) -> str:
    """Partner-supplied text, defused for spreadsheets that run cells as formulas."""
    if value is None:
        return ""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def _csv(lines: Sequence[StatementLine], *, header: bool = False) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180
    if header:
        writer.writerow(COLUMNS)
    for line in lines:
        writer.writerow(
            (
                line.created_at.isoformat(),
                line.entry_id,
                line.transfer_id,
                line.kind,
                line.counterparty_account_id,
                line.currency,
                line.posted_delta_minor,
                line.posted_after_minor,
                _text(line.out_trade_no),
                line.metadata,
            )
        )
    return out.getvalue().encode()


@routes.get("/v1/accounts/{account_id}/statements/{date}")
async def statement(request: web.Request) -> web.StreamResponse:
    account_id = path_id(request, "account_id", not_found="account_not_found")
    day, suffixed = _day(request)
    if not suffixed and not _accepts_csv(request):
        raise ProblemError("not_acceptable", detail="statements are text/csv")
    engine = request.app[ENGINE]
    today = engine.clock().date()
    if day > today:
        raise invalid("date", f"{day} has not begun yet (today is {today}, UTC)")
    if STREAM_SLOTS.locked():
        raise ProblemError("overloaded", detail="too many statements are being downloaded")
    async with STREAM_SLOTS:
        return await _stream(request, account_id, day)


async def _stream(request: web.Request, account_id: int, day: date) -> web.StreamResponse:
    engine = request.app[ENGINE]
    async with open_statement(engine, account_id, scope=caller_scope(request), day=day) as found:
        if found is None:
            raise ProblemError("account_not_found", detail=f"no account {account_id}")
        response = web.StreamResponse(
            headers={
                "Content-Type": f"{CSV_CONTENT_TYPE}; charset=utf-8",
                "Content-Disposition": f'attachment; filename="{account_id}-{day}.csv"',
                # Set here: the edge middleware adds it too late for a streamed response.
                "X-Request-Id": request[REQUEST_ID],
            }
        )
        await response.prepare(request)
        await response.write(_csv((), header=True))
        try:
            async with asyncio.timeout(STREAM_S_MAX):
                async for lines in found.chunks():
                    await response.write(_csv(lines))
        except (EngineError, TimeoutError) as error:
            # The status line is gone: cut the response short so the client sees an
            # incomplete (unterminated chunked) body, never a statement that looks whole.
            _log.warning("statement cut short: %r", error, extra={"account_id": account_id})
            if request.transport is not None:
                request.transport.abort()
            return response
    await response.write_eof()
    return response


ROUTES: Final = list(routes)
