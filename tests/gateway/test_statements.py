"""GET /v1/accounts/{id}/statements/{date}: a UTC day's CSV statement over HTTP."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from engine import AccountKind, CreateAccount
from gateway.routes import statements
from tests.gateway.support import UNKNOWN_ID, Api, assert_problem, serving, validate_response

TEMPLATE = "/v1/accounts/{account_id}/statements/{date}"
HEADER = [
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
]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 4, 30, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def api(dsn: str, clock: Clock) -> AsyncIterator[Api]:
    async with serving(dsn, clock=clock) as served:
        yield served


def _rows(body: bytes) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(body.decode()))
    header = next(reader)
    assert header == HEADER
    return [dict(zip(header, row, strict=True)) for row in reader]


async def test_a_days_statement_sums_to_its_balance_change(api: Api, clock: Clock) -> None:
    bank = await api.open_account("system")
    merchant = await api.open_account("merchant")
    assert (await api.move(bank, merchant, 5_000)).status == 201  # on April 30
    before = (await api.balance(merchant))["posted_minor"]
    clock.now = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
    sale = await api.move(bank, merchant, 1_234, metadata={"out_trade_no": "=HYPERLINK(1)"})
    assert sale.status == 201
    assert (await api.move(merchant, bank, 34)).status == 201
    hold = await api.move(merchant, bank, 100, pending=True)  # no posted movement yet
    assert hold.status == 201
    after = (await api.balance(merchant))["posted_minor"]
    clock.now = datetime(2026, 5, 2, 9, 0, tzinfo=UTC)
    assert (await api.post(f"/v1/transfers/{hold.json['id']}/void", {})).status == 200
    assert (await api.move(bank, merchant, 1)).status == 201  # on May 2

    reply = await api.get(f"/v1/accounts/{merchant}/statements/2026-05-01.csv")
    assert reply.status == 200, reply.body
    validate_response("GET", TEMPLATE, reply)
    assert reply.content_type == "text/csv"
    assert reply.headers["X-Request-Id"]
    rows = _rows(reply.body)
    assert [int(r["posted_delta_minor"]) for r in rows] == [1_234, -34]
    assert sum(int(r["posted_delta_minor"]) for r in rows) == after - before
    assert int(rows[0]["posted_after_minor"]) - 1_234 == before
    assert int(rows[-1]["posted_after_minor"]) == after
    assert rows[0]["transfer_id"] == sale.json["id"]
    assert rows[0]["counterparty_account_id"] == bank
    assert rows[0]["currency"] == "CNY" and rows[0]["kind"] == "transfer"
    assert rows[0]["out_trade_no"] == "'=HYPERLINK(1)"  # defused for spreadsheets
    assert '"out_trade_no"' in rows[0]["metadata"]
    assert rows[1]["out_trade_no"] == "" and rows[1]["metadata"] == "{}"
    assert all(r["created_at"].startswith("2026-05-01T00:00:00") for r in rows)

    # The same statement by Accept header instead of the suffix.
    by_accept = await api.get(
        f"/v1/accounts/{merchant}/statements/2026-05-01", headers={"Accept": "text/csv"}
    )
    assert by_accept.status == 200 and by_accept.body == reply.body


async def test_an_empty_day_has_the_header_only(api: Api) -> None:
    merchant = await api.open_account("merchant")
    reply = await api.get(f"/v1/accounts/{merchant}/statements/2026-01-31")
    assert reply.status == 200
    validate_response("GET", TEMPLATE, reply)
    assert _rows(reply.body) == []


async def test_someone_elses_or_an_unknown_account_is_not_found(api: Api) -> None:
    theirs = await api.engine.submit(
        CreateAccount(currency="CNY", kind=AccountKind.MERCHANT, scope="partner-2")
    )
    assert theirs.account is not None
    for account_id in (str(theirs.account.id), UNKNOWN_ID, "0"):
        reply = await api.get(f"/v1/accounts/{account_id}/statements/2026-04-01.csv")
        assert_problem(reply, 404, "account_not_found")
        validate_response("GET", TEMPLATE, reply)


async def test_bad_dates_and_types_are_refused(api: Api, clock: Clock) -> None:
    merchant = await api.open_account("merchant")
    for text in ("2026-13-01", "20260401", "yesterday", "2026-4-1", "2026-04-01.json"):
        reply = await api.get(f"/v1/accounts/{merchant}/statements/{text}")
        assert_problem(reply, 400, "validation_error")
    tomorrow = (clock.now + timedelta(days=1)).date()
    assert_problem(
        await api.get(f"/v1/accounts/{merchant}/statements/{tomorrow}"), 400, "validation_error"
    )
    reply = await api.get(
        f"/v1/accounts/{merchant}/statements/2026-04-01",
        headers={"Accept": "application/json"},
    )
    assert_problem(reply, 406, "not_acceptable")
    validate_response("GET", TEMPLATE, reply)


async def test_too_many_downloads_at_once_are_refused_for_a_while(api: Api) -> None:
    merchant = await api.open_account("merchant")
    path = f"/v1/accounts/{merchant}/statements/2026-04-01.csv"
    for _ in range(statements.STREAMS_CONCURRENT_MAX):
        await statements.STREAM_SLOTS.acquire()  # downloads in progress
    try:
        reply = await api.get(path)
        assert_problem(reply, 503, "overloaded")
        assert reply.headers["Retry-After"]
    finally:
        for _ in range(statements.STREAMS_CONCURRENT_MAX):
            statements.STREAM_SLOTS.release()
    assert (await api.get(path)).status == 200
