"""Top-ups and withdrawals over HTTP, driven through the bank simulator (banksim).

Each test starts its own simulator on a free port with the failure it needs on, and a
txengine whose clock the test controls, so deadlines pass without sleeping. After each
flow the ledger must reconcile and nothing must have moved twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from banksim import BankSimulator, Order, SimConfig
from engine.products import channels
from engine.reconcile import reconcile
from gateway.routes.channels import BANKS
from gateway.settings import from_env
from tests.gateway.support import (
    UNKNOWN_ID,
    Api,
    Reply,
    assert_problem,
    validate_request,
    validate_response,
)
from tests.gateway.support import serving as served

CALLBACK = "/v1/channels/{channel}/callbacks"


class Clock:
    """The engine's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    def unix(self) -> int:
        return int(self.now.timestamp())


@dataclasses.dataclass
class Setup:
    api: Api
    bank: BankSimulator
    clock: Clock
    user: str  # a CNY user account holding 10,000

    async def topup(self, amount: int = 500, channel: str = "ebank", **fields: Any) -> Reply:
        body = {
            "account_id": self.user,
            "amount_minor": amount,
            "currency": "CNY",
            "channel": channel,
            **fields,
        }
        reply = await self.api.post("/v1/topups", body)
        if reply.status == 201:
            validate_request("/v1/topups", body)
        validate_response("POST", "/v1/topups", reply)
        return reply

    async def withdraw(self, amount: int = 500, channel: str = "card", **fields: Any) -> Reply:
        body = {
            "account_id": self.user,
            "amount_minor": amount,
            "currency": "CNY",
            "channel": channel,
            "destination": "6222020200112233",
            **fields,
        }
        reply = await self.api.post("/v1/withdrawals", body)
        if reply.status == 201:
            validate_request("/v1/withdrawals", body)
        validate_response("POST", "/v1/withdrawals", reply)
        return reply

    async def read(self, kind: str, request_id: str) -> dict[str, Any]:
        reply = await self.api.get(f"/v1/{kind}s/{request_id}")
        assert reply.status == 200, reply
        validate_response("GET", f"/v1/{kind}s/{{{kind}_id}}", reply)
        body: dict[str, Any] = reply.json
        return body

    def order(self, channel: str, request_id: str) -> Order:
        return self.bank.orders[(channel, request_id)]

    async def answer(self, channel: str, request_id: str, status: str, **kwargs: Any) -> int:
        """Have the bank call back now, signed at the engine's clock."""
        kwargs.setdefault("timestamp", self.clock.unix())
        return await self.bank.callback(self.order(channel, request_id), status=status, **kwargs)

    async def callback(self, channel: str, body: bytes, headers: dict[str, str]) -> Reply:
        path = CALLBACK.format(channel=channel)
        reply = await self.api.post(path, raw=body, key=None, headers=headers)
        validate_response("POST", CALLBACK, reply)
        return reply

    async def ledger(self) -> dict[str, Any]:
        """Everything money-shaped, to compare before and after a refused step."""
        async with self.api.engine.pool.acquire() as conn:
            row = await conn.fetchrow(
                """SELECT (SELECT count(*) FROM transfers) transfers,
                          (SELECT count(*) FROM entries) entries,
                          (SELECT count(*) FROM channel_requests) requests,
                          (SELECT count(*) FROM outbox_events) events,
                          (SELECT json_agg(json_build_array(id, debits_posted, credits_posted,
                                  debits_pending, credits_pending) ORDER BY id)::text
                           FROM accounts) balances"""
            )
        return dict(row)

    async def callbacks(self, request_id: str) -> list[str]:
        async with self.api.engine.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT outcome FROM channel_callbacks WHERE request_id = $1 ORDER BY id",
                int(request_id),
            )
        return [row["outcome"] for row in rows]

    async def events(self, request_id: str) -> list[str]:
        async with self.api.engine.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT type FROM outbox_events WHERE subject_id = $1 ORDER BY id",
                int(request_id),
            )
        return [row["type"] for row in rows]

    async def balance(self) -> dict[str, int]:
        return await self.api.balance(self.user)

    async def assert_consistent(self) -> None:
        async with self.api.engine.pool.acquire() as conn:
            outcomes = await reconcile(conn)
        assert [o for o in outcomes if o.violations] == []


@contextlib.asynccontextmanager
async def serving(dsn: str, clock: Clock, bank_url: str, *, port: int = 0) -> AsyncIterator[Api]:
    """txengine on a real engine with the test's clock, its channels at `bank_url`."""
    defaults = from_env()
    channels = {
        name: dataclasses.replace(config, base_url=bank_url)
        for name, config in defaults.channels.items()
    }
    banks = dataclasses.replace(defaults.banks, request_timeout_s=2.0, retry_backoff_s=0.01)
    async with served(dsn, clock=clock, port=port, channels=channels, banks=banks) as api:
        app = api.client.server.app
        callback_base_url = str(api.client.make_url(""))
        app[BANKS].config = dataclasses.replace(
            app[BANKS].config, callback_base_url=callback_base_url
        )
        yield api


@contextlib.asynccontextmanager
async def setup(dsn: str, **sim: Any) -> AsyncIterator[Setup]:
    sim.setdefault("latency_ms", 0)
    sim.setdefault("callback_retry_s", 0.01)
    bank = BankSimulator(SimConfig(**sim))
    url = await bank.start()
    clock = Clock()
    try:
        async with serving(dsn, clock, url) as api:
            bank_account = await api.open_account("system")
            user = await api.open_account("user")
            assert (await api.move(bank_account, user, 10_000)).status == 201
            yield Setup(api=api, bank=bank, clock=clock, user=user)
    finally:
        await bank.stop()


# -- top-ups ---------------------------------------------------------------------------------


async def test_a_topup_is_a_pending_credit_until_the_bank_confirms_it(dsn: str) -> None:
    async with setup(dsn, latency_ms=50) as s:
        reply = await s.topup(500, notify_url="https://partner.example/notify")
        assert reply.status == 201, reply
        topup = reply.json
        assert topup["object"] == "topup" and topup["state"] == "pending"
        assert topup["instructions"]["type"] == "redirect"
        assert await s.balance() == {
            "posted_minor": 10_000,
            "pending_minor": 500,
            "available_minor": 10_000,
        }
        await s.bank.idle()
        done = await s.read("topup", topup["id"])
        assert done["state"] == "succeeded"
        assert done["bank_reference"] == s.order("ebank", topup["id"]).bank_reference
        assert done["resolved_at"] is not None
        assert await s.balance() == {
            "posted_minor": 10_500,
            "pending_minor": 0,
            "available_minor": 10_500,
        }
        hold = await s.api.engine.transfer(int(topup["hold_id"]), scope=None)
        assert hold is not None and hold.status == "posted"
        assert hold.credit_account_id == int(s.user) and hold.expires_at is None
        assert await s.events(topup["id"]) == ["topup.succeeded"]
        assert await s.callbacks(topup["id"]) == ["applied"]
        await s.assert_consistent()


async def test_a_failed_topup_voids_its_hold(dsn: str) -> None:
    async with setup(dsn, failure_rate=1.0) as s:
        topup = (await s.topup(700, channel="card")).json
        assert topup["instructions"] is None  # the linked card is debited by the bank alone
        await s.bank.idle()
        done = await s.read("topup", topup["id"])
        assert done["state"] == "failed"
        assert done["failure_reason"] == "declined by the simulated bank"
        assert await s.balance() == {
            "posted_minor": 10_000,
            "pending_minor": 0,
            "available_minor": 10_000,
        }
        assert await s.events(topup["id"]) == ["topup.failed"]
        await s.assert_consistent()


async def test_cash_and_postal_topups_tell_the_payer_what_to_do(dsn: str) -> None:
    async with setup(dsn, silence_rate=1.0) as s:
        cash = (await s.topup(1_000, channel="cash")).json
        slip = cash["instructions"]
        assert slip["type"] == "payment_slip"
        assert (
            slip["reference"].startswith(cash["id"])
            and len(slip["reference"]) == len(cash["id"]) + 1
        )
        assert slip["amount_minor"] == 1_000
        assert datetime.fromisoformat(slip["pay_before"]) == s.clock.now + timedelta(days=1)
        postal = (await s.topup(1_000, channel="postal")).json
        assert postal["instructions"]["type"] == "remittance"
        assert datetime.fromisoformat(postal["expires_at"]) == s.clock.now + timedelta(days=3)
        # A read shows the same instructions as the answer to the request.
        assert (await s.read("topup", cash["id"]))["instructions"] == slip


async def test_a_retried_topup_request_opens_one_hold(dsn: str) -> None:
    async with setup(dsn, silence_rate=1.0) as s:
        body = {"account_id": s.user, "amount_minor": 300, "currency": "CNY", "channel": "ebank"}
        first = await s.api.post("/v1/topups", body, key="topup-1")
        again = await s.api.post("/v1/topups", body, key="topup-1")
        assert first.status == again.status == 201
        assert again.json == first.json
        assert again.headers["Idempotent-Replayed"] == "true"
        assert (await s.ledger())["requests"] == 1
        assert len(s.bank.orders) == 1
        other = await s.api.post("/v1/topups", {**body, "amount_minor": 301}, key="topup-1")
        assert_problem(other, 422, "idempotency_key_reused")


# -- withdrawals -----------------------------------------------------------------------------


async def test_a_withdrawal_holds_the_money_then_settles(dsn: str) -> None:
    async with setup(dsn, latency_ms=50) as s:
        reply = await s.withdraw(2_500)
        assert reply.status == 201, reply
        withdrawal = reply.json
        assert withdrawal["object"] == "withdrawal" and withdrawal["state"] == "pending"
        assert withdrawal["destination"] == "************2233"
        assert await s.balance() == {
            "posted_minor": 10_000,
            "pending_minor": -2_500,
            "available_minor": 7_500,
        }
        assert s.order("card", withdrawal["id"]).operation == "pay"
        await s.bank.idle()
        assert (await s.read("withdrawal", withdrawal["id"]))["state"] == "succeeded"
        assert await s.balance() == {
            "posted_minor": 7_500,
            "pending_minor": 0,
            "available_minor": 7_500,
        }
        assert await s.events(withdrawal["id"]) == ["withdrawal.succeeded"]
        await s.assert_consistent()


async def test_a_partner_cannot_void_or_post_a_withdrawal_hold_itself(dsn: str) -> None:
    # Voiding the hold while the bank pays out would hand the money back a second time.
    async with setup(dsn, latency_ms=300) as s:
        withdrawal = (await s.withdraw(2_500)).json
        hold = withdrawal["hold_id"]
        for action in ("void", "post"):
            reply = await s.api.post(f"/v1/transfers/{hold}/{action}", {})
            assert_problem(reply, 409, "transfer_held_by_product")
        await s.bank.idle()
        assert (await s.read("withdrawal", withdrawal["id"]))["state"] == "succeeded"
        assert (await s.balance())["posted_minor"] == 7_500
        await s.assert_consistent()


async def test_a_failed_withdrawal_returns_the_money(dsn: str) -> None:
    async with setup(dsn, failure_rate=1.0) as s:
        withdrawal = (await s.withdraw(2_500, channel="ebank")).json
        await s.bank.idle()
        assert (await s.read("withdrawal", withdrawal["id"]))["state"] == "failed"
        assert await s.balance() == {
            "posted_minor": 10_000,
            "pending_minor": 0,
            "available_minor": 10_000,
        }
        assert await s.events(withdrawal["id"]) == ["withdrawal.failed"]
        await s.assert_consistent()


async def test_a_withdrawal_beyond_the_balance_holds_nothing(dsn: str) -> None:
    async with setup(dsn) as s:
        before = await s.ledger()
        reply = await s.withdraw(10_001)
        assert_problem(reply, 422, "insufficient_funds")
        assert await s.ledger() == before
        assert s.bank.orders == {}  # the bank was never asked
        # Money already held by one withdrawal cannot be withdrawn again.
        assert (await s.withdraw(6_000, channel="postal")).status == 201
        assert_problem(await s.withdraw(6_000), 422, "insufficient_funds")
        await s.assert_consistent()


async def test_requests_that_cannot_be_made_are_refused_and_change_nothing(dsn: str) -> None:
    async with setup(dsn, silence_rate=1.0) as s:
        before = await s.ledger()
        cash = await s.withdraw(100, channel="cash")
        assert_problem(cash, 422, "channel_direction_unsupported")
        unknown = await s.api.post(
            "/v1/topups",
            {"account_id": s.user, "amount_minor": 1, "currency": "CNY", "channel": "carrier"},
        )
        assert_problem(unknown, 400, "validation_error")
        assert_problem(await s.topup(1, account_id=UNKNOWN_ID), 404, "account_not_found")
        assert_problem(await s.topup(1, currency="USD"), 422, "currency_mismatch")
        assert_problem(await s.withdraw(1, destination="12"), 400, "validation_error")
        assert await s.ledger() == before
        house = await s.api.open_account("system")
        before = await s.ledger()
        assert_problem(await s.topup(1, account_id=house), 422, "channel_account_invalid")
        assert await s.ledger() == before
        assert s.bank.orders == {}
        for kind in ("topup", "withdrawal"):
            reply = await s.api.get(f"/v1/{kind}s/{UNKNOWN_ID}")
            assert_problem(reply, 404, f"{kind}_not_found")
            validate_response("GET", f"/v1/{kind}s/{{{kind}_id}}", reply)
        topup = (await s.topup(1)).json
        assert_problem(
            await s.api.get(f"/v1/withdrawals/{topup['id']}"), 404, "withdrawal_not_found"
        )


# -- callbacks -------------------------------------------------------------------------------


async def test_a_duplicate_callback_is_answered_and_does_nothing(dsn: str) -> None:
    async with setup(dsn, duplicate_rate=1.0) as s:
        topup = (await s.topup(400)).json
        await s.bank.idle()
        assert s.order("ebank", topup["id"]).callbacks == [200, 200]
        assert await s.callbacks(topup["id"]) == ["applied", "duplicate"]
        assert (await s.balance())["posted_minor"] == 10_400
        # A bank retrying much later is still told "done", and still nothing moves.
        before = await s.ledger()
        body = s.bank.callback_body(s.order("ebank", topup["id"]), status="succeeded")
        reply = await s.callback("ebank", body, _signed("ebank", body, s.clock.unix()))
        assert reply.status == 200 and reply.json["outcome"] == "duplicate"
        assert reply.json["request"]["state"] == "succeeded"
        assert await s.ledger() == before
        assert await s.events(topup["id"]) == ["topup.succeeded"]
        await s.assert_consistent()


def _signed(channel: str, body: bytes, timestamp: int, secret: str | None = None) -> dict[str, str]:
    from banksim.simulator import sign

    secret = secret or f"txengine-dev-secret-{channel}"
    return {"Content-Type": "application/json", "Bank-Signature": sign(secret, timestamp, body)}


async def test_forged_and_stale_callbacks_are_refused_and_move_nothing(dsn: str) -> None:
    async with setup(dsn, silence_rate=1.0) as s:
        topup = (await s.topup(900)).json
        order = s.order("ebank", topup["id"])
        body = s.bank.callback_body(order, status="succeeded")
        now = s.clock.unix()
        before = await s.ledger()
        forged = [
            ("no signature", body, {"Content-Type": "application/json"}),
            ("another secret", body, _signed("ebank", body, now, "an-attacker-guessing-it")),
            ("another channel's secret", body, _signed("card", body, now)),
            ("stale", body, _signed("ebank", body, now - 301)),
            ("from the future", body, _signed("ebank", body, now + 301)),
            ("body changed", body.replace(b"900", b"990"), _signed("ebank", body, now)),
            ("garbage", body, {"Bank-Signature": "t=x,v1=", "Content-Type": "application/json"}),
        ]  # fmt: skip
        for reason, sent, headers in forged:
            reply = await s.callback("ebank", sent, headers)
            assert_problem(reply, 401, "callback_signature_invalid")
            assert await s.ledger() == before, reason
        assert await s.callbacks(topup["id"]) == []
        # Through the simulator with a wrong secret: refused, and the bank stops retrying.
        assert await s.answer("ebank", topup["id"], "succeeded", secret="x" * 32) == 401
        # Just inside the tolerance is accepted.
        assert await s.answer("ebank", topup["id"], "succeeded", timestamp=now - 299) == 200
        assert (await s.read("topup", topup["id"]))["state"] == "succeeded"
        await s.assert_consistent()


async def test_callbacks_that_do_not_fit_the_request_are_refused(dsn: str) -> None:
    async with setup(dsn, silence_rate=1.0) as s:
        topup = (await s.topup(900)).json
        now = s.clock.unix()
        before = await s.ledger()
        wrong = json.dumps(
            {
                "request_id": topup["id"],
                "status": "succeeded",
                "amount_minor": 9_000,
                "currency": "CNY",
                "bank_reference": "EBANK-1",
            }
        ).encode()
        assert_problem(
            await s.callback("ebank", wrong, _signed("ebank", wrong, now)), 422, "callback_mismatch"
        )
        unknown = wrong.replace(topup["id"].encode(), UNKNOWN_ID.encode())
        assert_problem(
            await s.callback("ebank", unknown, _signed("ebank", unknown, now)),
            404,
            "channel_request_not_found",
        )
        huge = wrong.replace(topup["id"].encode(), b"9" * 19)
        assert_problem(
            await s.callback("ebank", huge, _signed("ebank", huge, now)),
            404,
            "channel_request_not_found",
        )
        # The request exists, but at another channel.
        body = s.bank.callback_body(s.order("ebank", topup["id"]), status="succeeded")
        assert_problem(
            await s.callback("card", body, _signed("card", body, now)),
            404,
            "channel_request_not_found",
        )
        assert_problem(
            await s.callback("carrier", body, _signed("ebank", body, now)), 404, "channel_not_found"
        )
        garbage = b'{"request_id": 1}'
        assert_problem(
            await s.callback("ebank", garbage, _signed("ebank", garbage, now)),
            400,
            "validation_error",
        )
        after = await s.ledger()
        assert {k: v for k, v in after.items()} == before
        assert await s.callbacks(topup["id"]) == ["mismatch"]  # recorded, nothing moved
        # A contradiction after the first answer is refused too.
        assert await s.answer("ebank", topup["id"], "failed") == 200
        settled = await s.ledger()
        assert await s.answer("ebank", topup["id"], "succeeded") == 409
        assert await s.ledger() == settled
        assert await s.callbacks(topup["id"]) == ["mismatch", "applied", "conflict"]
        await s.assert_consistent()


async def test_concurrent_callbacks_for_one_topup_have_one_effect(dsn: str) -> None:
    async with setup(dsn, silence_rate=1.0) as s:
        topup = (await s.topup(800)).json
        statuses = await asyncio.gather(
            *(s.answer("ebank", topup["id"], "succeeded") for _ in range(12))
        )
        assert statuses == [200] * 12
        outcomes = await s.callbacks(topup["id"])
        assert sorted(outcomes) == ["applied"] + ["duplicate"] * 11
        assert (await s.balance())["posted_minor"] == 10_800
        assert await s.events(topup["id"]) == ["topup.succeeded"]
        await s.assert_consistent()


async def test_success_and_failure_racing_resolve_the_hold_once(dsn: str) -> None:
    async with setup(dsn, silence_rate=1.0) as s:
        withdrawal = (await s.withdraw(800)).json
        answers = await asyncio.gather(
            *(s.answer("card", withdrawal["id"], status) for status in ("succeeded", "failed") * 6)
        )
        state = (await s.read("withdrawal", withdrawal["id"]))["state"]
        assert sorted(answers) == [200] * 6 + [409] * 6  # the winner's status, repeated
        posted = (await s.balance())["posted_minor"]
        assert posted == (9_200 if state == "succeeded" else 10_000)
        assert (await s.callbacks(withdrawal["id"])).count("applied") == 1
        await s.assert_consistent()


# -- the deadline ----------------------------------------------------------------------------


async def test_a_silent_bank_times_out_and_a_late_callback_is_refused(dsn: str) -> None:
    async with setup(dsn, silence_rate=1.0) as s:
        topup = (await s.topup(600)).json
        withdrawal = (await s.withdraw(600, channel="ebank")).json
        engine = s.api.engine
        s.clock.advance(minutes=29, seconds=59)
        assert await channels.time_out_once(engine, now=s.clock.now, limit=10) == 0
        s.clock.advance(seconds=1)
        assert await channels.time_out_once(engine, now=s.clock.now, limit=10) == 2
        assert await channels.time_out_once(engine, now=s.clock.now, limit=10) == 0
        for kind, request in (("topup", topup), ("withdrawal", withdrawal)):
            done = await s.read(kind, request["id"])
            assert done["state"] == "timed_out"
            assert done["failure_reason"] == "no answer from the bank"
            assert await s.events(request["id"]) == [f"{kind}.timed_out"]
        assert await s.balance() == {
            "posted_minor": 10_000,
            "pending_minor": 0,
            "available_minor": 10_000,
        }
        before = await s.ledger()
        assert await s.answer("ebank", topup["id"], "succeeded") == 409
        late = await s.callback(
            "ebank",
            body := s.bank.callback_body(s.order("ebank", topup["id"]), status="succeeded"),
            _signed("ebank", body, s.clock.unix()),
        )
        problem = assert_problem(late, 409, "channel_request_timed_out")
        assert problem["state"] == "timed_out"
        assert await s.ledger() == before
        assert await s.callbacks(topup["id"]) == ["late", "late"]
        await s.assert_consistent()


async def test_an_unreachable_bank_is_tried_again_by_a_retry_or_times_out(dsn: str) -> None:
    bank = BankSimulator(SimConfig(latency_ms=0, silence_rate=1.0))
    url = await bank.start()
    port = int(url.rsplit(":", 1)[1])
    await bank.stop()  # nobody listens there now
    clock = Clock()
    async with serving(dsn, clock, url) as api:
        user = await api.open_account("user")
        body = {"account_id": user, "amount_minor": 300, "currency": "CNY", "channel": "ebank"}
        first = await api.post("/v1/topups", body, key="k1")
        assert first.status == 201 and first.json["state"] == "pending"
        lost = await api.post("/v1/topups", {**body, "amount_minor": 301}, key="k2")
        async with api.engine.pool.acquire() as conn:
            sent = await conn.fetch("SELECT sent_at, send_attempts FROM channel_requests")
        # One dispatch each (of send_attempts_max HTTP attempts), none acknowledged.
        assert [(r["sent_at"], r["send_attempts"]) for r in sent] == [(None, 1), (None, 1)]
        # The bank is back: the partner's retry of the same request sends it.
        revived = BankSimulator(SimConfig(latency_ms=0, silence_rate=1.0))
        await revived.start(port=port)
        try:
            again = await api.post("/v1/topups", body, key="k1")
            assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
            assert list(revived.orders) == [("ebank", first.json["id"])]
            await api.post("/v1/topups", body, key="k1")  # sent once is enough
            assert len(revived.orders) == 1 and revived.stats["repeats"] == 0
            async with api.engine.pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT sent_at, send_attempts FROM channel_requests WHERE id = $1",
                    int(first.json["id"]),
                )
            assert row["sent_at"] is not None and row["send_attempts"] == 2
        finally:
            await revived.stop()
        # The one never sent times out like a silent bank: its pending credit is voided.
        clock.advance(minutes=31)
        assert await channels.time_out_once(api.engine, now=clock.now, limit=10) == 2
        assert (await api.get(f"/v1/topups/{lost.json['id']}")).json["state"] == "timed_out"
        assert await api.balance(user) == {
            "posted_minor": 0,
            "pending_minor": 0,
            "available_minor": 0,
        }


# -- restarts --------------------------------------------------------------------------------


async def test_a_callback_after_a_restart_settles_exactly_once(dsn: str) -> None:
    bank = BankSimulator(SimConfig(latency_ms=0, silence_rate=1.0, callback_retry_s=0.01))
    url = await bank.start()
    clock = Clock()
    try:
        async with serving(dsn, clock, url) as api:
            user = await api.open_account("user")
            body = {"account_id": user, "amount_minor": 250, "currency": "CNY", "channel": "card"}
            topup = (await api.post("/v1/topups", body)).json
            other = (await api.post("/v1/topups", {**body, "amount_minor": 7})).json
            port = api.client.port
        # txengine is down: the bank's callback gets no answer, and it gives up for now.
        order = bank.orders[("card", topup["id"])]
        assert await bank.callback(order, status="succeeded", timestamp=clock.unix()) == 0
        async with serving(dsn, clock, url, port=port) as api:
            answers = await asyncio.gather(
                bank.callback(order, status="succeeded", timestamp=clock.unix()),
                bank.callback(order, status="succeeded", timestamp=clock.unix()),
            )
            assert sorted(answers) == [200, 200]
            assert (await api.get(f"/v1/topups/{topup['id']}")).json["state"] == "succeeded"
            assert (await api.balance(user))["posted_minor"] == 250
            # The other's deadline survived the restart and fires once.
            clock.advance(minutes=10)
            assert await channels.time_out_once(api.engine, now=clock.now, limit=10) == 1
        async with serving(dsn, clock, url, port=port) as api:
            assert await channels.time_out_once(api.engine, now=clock.now, limit=10) == 0
            assert (await api.get(f"/v1/topups/{other['id']}")).json["state"] == "timed_out"
            async with api.engine.pool.acquire() as conn:
                outcomes = await conn.fetch(
                    "SELECT outcome FROM channel_callbacks ORDER BY outcome"
                )
                events = await conn.fetchval("SELECT count(*) FROM outbox_events")
                assert [o for o in await reconcile(conn) if o.violations] == []
            assert [r["outcome"] for r in outcomes] == ["applied", "duplicate"]
            assert events == 2  # topup.succeeded and topup.timed_out, once each
            assert (await api.balance(user))["posted_minor"] == 250
    finally:
        await bank.stop()


# -- the document ----------------------------------------------------------------------------


async def test_every_channel_route_answers_as_documented(dsn: str) -> None:
    """The responses above are validated as they come; this one covers the callback's
    200 explicitly."""
    async with setup(dsn, silence_rate=1.0) as s:
        topup = (await s.topup(100)).json
        body = s.bank.callback_body(s.order("ebank", topup["id"]), status="succeeded")
        reply = await s.callback("ebank", body, _signed("ebank", body, s.clock.unix()))
        assert reply.status == 200 and reply.json["outcome"] == "applied"
        assert reply.json["request"]["state"] == "succeeded"


@pytest.mark.parametrize("rate", [0.3])
async def test_a_busy_bank_with_every_failure_on_leaves_a_consistent_ledger(
    dsn: str, rate: float
) -> None:
    """Many requests through a bank that fails, falls silent and repeats itself: every
    request ends once, and the user's balance is what the outcomes say."""
    async with setup(
        dsn, latency_ms=5, failure_rate=rate, silence_rate=0.2, duplicate_rate=rate, seed=7
    ) as s:
        topups = await asyncio.gather(*(s.topup(10 + i) for i in range(20)))
        withdrawals = await asyncio.gather(*(s.withdraw(5 + i, channel="ebank") for i in range(20)))
        await s.bank.idle()
        s.clock.advance(hours=1)
        await channels.time_out_once(s.api.engine, now=s.clock.now, limit=100)
        expected = 10_000
        for kind, replies, sign in (("topup", topups, 1), ("withdrawal", withdrawals, -1)):
            for reply in replies:
                request = await s.read(kind, reply.json["id"])
                assert request["state"] != "pending"
                fate = s.order("ebank", request["id"]).fate.value
                want = "timed_out" if fate == "silence" else fate
                assert request["state"] == want
                if want == "succeeded":
                    expected += sign * request["amount_minor"]
        assert await s.balance() == {
            "posted_minor": expected,
            "pending_minor": 0,
            "available_minor": expected,
        }
        await s.assert_consistent()
