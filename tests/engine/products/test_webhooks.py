"""Webhook delivery: signed events received by a real local HTTP server, Alipay's retry
schedule on a controlled clock, dead letters, redelivery, secret rotation, a receiver
that hangs, events of rolled-back steps, several dispatchers at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import msgspec
import pytest

from engine import Engine, InvalidCursor
from engine.products import Refusal, Step, run_step, webhooks
from engine.products import dispatcher as dispatch
from engine.products.dispatcher import DispatcherConfig
from engine.products.webhooks import DeliveryStatus
from tests.conftest import TEST_ENGINE_CONFIG
from tests.engine.products.webhook_support import Receiver, receiving

START = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
CONFIG = DispatcherConfig(batch_size_max=10, sends_concurrent_max=4, timeout_s=2.0)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Noted(msgspec.Struct, frozen=True):
    event_id: int


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def engine(dsn: str, clock: Clock) -> AsyncIterator[Engine]:
    opened = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def receiver(clock: Clock) -> AsyncIterator[Receiver]:
    async with receiving(lambda: clock.now.timestamp()) as served:
        yield served


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with dispatch.open_session(CONFIG) as opened:
        yield opened


async def _secret(engine: Engine, scope: str = "p1") -> str:
    async with engine.pool.acquire() as conn:
        return await webhooks.create_secret(
            conn, scope=scope, now=engine.clock(), next_id=engine.next_id
        )


async def _notify(
    engine: Engine, url: str | None, *, scope: str = "p1", refuse: bool = False
) -> int | None:
    async def step(s: Step) -> Noted:
        event_id = await s.notify(
            event_type="trade.paid", subject_id=42, payload={"out_trade_no": "T1"}, notify_url=url
        )
        if refuse:
            raise Refusal("trade_state_conflict", "rolled back")
        return Noted(event_id)

    outcome = await run_step(engine, step, answer_type=Noted, scope=scope, idempotency=None)
    return None if outcome.value is None else outcome.value.event_id


async def _deliveries(engine: Engine, scope: str = "p1") -> list[webhooks.DeliveryView]:
    page = await webhooks.list_deliveries(
        engine, scope=scope, status=None, limit=100, starting_after=None
    )
    return list(page.deliveries)


async def _run(engine: Engine, session: aiohttp.ClientSession, **config: float) -> int:
    used = DispatcherConfig(**{**vars(CONFIG), **config}) if config else CONFIG
    return await dispatch.run_once(engine, session, config=used)


async def test_an_event_is_delivered_signed_once(
    engine: Engine, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    event_id = await _notify(engine, receiver.url())
    assert await _run(engine, session) == 1
    (got,) = receiver.received
    assert got.verified
    assert got.event_id == str(event_id) == got.json["id"]
    assert got.json["type"] == "trade.paid" and got.json["object"] == "event"
    assert got.json["data"] == {"out_trade_no": "T1"}
    assert got.headers["Txengine-Delivery-Attempt"] == "1"
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.attempts == 1
    assert delivery.last_status_code == 200 and delivery.delivered_at == START
    assert delivery.event_id == event_id and delivery.next_attempt_at is None
    # Nothing more is due: a delivered event is not sent again.
    assert await _run(engine, session) == 0 and len(receiver.received) == 1


async def test_a_forged_or_stale_signature_does_not_verify(
    engine: Engine, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    secret = await _secret(engine)
    receiver.secrets = ["whsec_" + "0" * 64]  # the receiver knows another secret
    await _notify(engine, receiver.url())
    await _run(engine, session)
    (got,) = receiver.received
    assert not got.verified
    header = got.headers["Txengine-Signature"]
    now = START.timestamp()
    assert dispatch.signatures.verify(header, got.body, [secret], now=now)
    assert not dispatch.signatures.verify(header, got.body + b" ", [secret], now=now)
    assert not dispatch.signatures.verify(header, got.body, [secret], now=now + 301)
    assert dispatch.signatures.verify(header, got.body, [secret], now=now + 300)


async def test_failures_retry_on_alipays_schedule_then_the_delivery_is_dead(
    engine: Engine, clock: Clock, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    receiver.answer_status = 500
    event_id = await _notify(engine, receiver.url())
    assert await _run(engine, session) == 1
    for attempt, delay_s in enumerate(webhooks.RETRY_SCHEDULE_S, start=2):
        (delivery,) = await _deliveries(engine)
        assert delivery.status == DeliveryStatus.PENDING
        assert delivery.next_attempt_at == clock.now + timedelta(seconds=delay_s)
        clock.advance(delay_s - 1)
        assert await _run(engine, session) == 0, "not due a second early"
        clock.advance(1)
        assert await _run(engine, session) == 1
        assert receiver.received[-1].headers["Txengine-Delivery-Attempt"] == str(attempt)
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.DEAD and delivery.attempts == webhooks.ATTEMPTS_MAX
    assert delivery.next_attempt_at is None and delivery.last_status_code == 500
    assert len(receiver.received) == 8 == webhooks.ATTEMPTS_MAX
    assert {r.event_id for r in receiver.received} == {str(event_id)}
    assert all(r.verified for r in receiver.received)
    assert len({r.body for r in receiver.received}) == 1, "the same bytes on every attempt"
    clock.advance(30 * 24 * 3600)
    assert await _run(engine, session) == 0, "a dead delivery is never sent again"


async def test_a_2xx_without_success_in_the_body_is_a_failure(
    engine: Engine, clock: Clock, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    receiver.answer_body = b"<html>ok</html>"
    await _notify(engine, receiver.url())
    await _run(engine, session)
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1
    assert delivery.last_status_code == 200 and "html" in (delivery.last_error or "")
    receiver.answer_body = b"success\n"
    clock.advance(webhooks.RETRY_SCHEDULE_S[0])
    await _run(engine, session)
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.attempts == 2


async def test_a_receiver_that_hangs_times_out_as_a_failure(
    engine: Engine, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    receiver.hang_s = 5.0
    await _notify(engine, receiver.url())
    started = time.monotonic()
    assert await _run(engine, session, timeout_s=0.3) == 1
    assert time.monotonic() - started < 2.0
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1
    assert delivery.last_status_code is None and "no answer" in (delivery.last_error or "")


async def test_an_unreachable_url_is_a_failure_with_its_error_kept_short(
    engine: Engine, session: aiohttp.ClientSession
) -> None:
    await _secret(engine)
    await _notify(engine, "http://127.0.0.1:1/" + "x" * 1000)
    assert await _run(engine, session) == 1
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.PENDING and delivery.last_error
    assert len(delivery.last_error) <= webhooks.LAST_ERROR_LENGTH_MAX


async def test_without_a_secret_nothing_is_sent_unsigned(
    engine: Engine, clock: Clock, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    await _notify(engine, receiver.url())
    assert await _run(engine, session) == 1
    assert receiver.received == []
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.PENDING and "no webhook secret" in str(
        delivery.last_error
    )
    receiver.secrets = [await _secret(engine)]
    clock.advance(webhooks.RETRY_SCHEDULE_S[0])
    await _run(engine, session)
    assert [r.verified for r in receiver.received] == [True]


async def test_events_of_a_rolled_back_step_are_never_delivered(
    engine: Engine, clock: Clock, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    assert await _notify(engine, receiver.url(), refuse=True) is None
    assert await _notify(engine, None) is not None  # recorded only: no delivery either
    clock.advance(3600)
    assert await _run(engine, session) == 0
    assert receiver.received == [] and await _deliveries(engine) == []
    async with engine.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox_events") == 1


async def test_an_event_too_large_is_dead_at_once(
    engine: Engine, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    await _notify(engine, receiver.url())
    assert await _run(engine, session, body_size_max_bytes=64) == 1
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.DEAD and receiver.received == []


async def test_rotation_signs_with_both_secrets_for_the_overlap(
    engine: Engine, clock: Clock, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    old = await _secret(engine)
    async with engine.pool.acquire() as conn:
        with pytest.raises(webhooks.SecretExists):
            await webhooks.create_secret(conn, scope="p1", now=clock.now, next_id=engine.next_id)
        new = await webhooks.rotate_secret(
            conn, scope="p1", now=clock.now, next_id=engine.next_id, overlap_s=3600
        )
        with pytest.raises(webhooks.SecretNotFound):
            await webhooks.rotate_secret(conn, scope="p2", now=clock.now, next_id=engine.next_id)
    assert new != old
    await _notify(engine, receiver.url())
    await _run(engine, session)
    (got,) = receiver.received
    header, now = got.headers["Txengine-Signature"], clock.now.timestamp()
    assert header.count("v1=") == 2
    assert dispatch.signatures.verify(header, got.body, [old], now=now)
    assert dispatch.signatures.verify(header, got.body, [new], now=now)
    # After the overlap only the new secret signs.
    clock.advance(3601)
    await _notify(engine, receiver.url())
    await _run(engine, session)
    header, now = receiver.received[-1].headers["Txengine-Signature"], clock.now.timestamp()
    assert header.count("v1=") == 1
    assert dispatch.signatures.verify(header, receiver.received[-1].body, [new], now=now)
    assert not dispatch.signatures.verify(header, receiver.received[-1].body, [old], now=now)


async def test_redelivery_sends_the_same_event_again_and_refuses_other_scopes(
    engine: Engine, clock: Clock, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    event_id = await _notify(engine, receiver.url())
    await _run(engine, session)
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.DELIVERED

    other = await run_step(
        engine,
        webhooks.redeliver(delivery.id),
        answer_type=webhooks.DeliveryView,
        scope="p2",
        idempotency=None,
    )
    assert other.refusal is not None and other.refusal.code == webhooks.NOT_FOUND
    assert (await _deliveries(engine))[0] == delivery, "a refusal changes nothing"

    clock.advance(60)
    again = await run_step(
        engine,
        webhooks.redeliver(delivery.id),
        answer_type=webhooks.DeliveryView,
        scope="p1",
        idempotency=None,
    )
    assert again.value is not None
    assert again.value.status == DeliveryStatus.PENDING and again.value.attempts == 0
    assert again.value.next_attempt_at == clock.now
    assert await _run(engine, session) == 1
    assert [r.event_id for r in receiver.received] == [str(event_id)] * 2
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.attempts == 1


async def test_several_dispatchers_send_each_attempt_once(
    dsn: str, engine: Engine, clock: Clock, receiver: Receiver
) -> None:
    receiver.secrets = [await _secret(engine)]
    receiver.hang_s = 0.05
    for _ in range(30):
        await _notify(engine, receiver.url())
    second = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        async with dispatch.open_session(CONFIG) as s1, dispatch.open_session(CONFIG) as s2:
            counts = await asyncio.gather(
                *(_run(e, s) for e, s in [(engine, s1), (second, s2)] * 3)
            )
    finally:
        await second.close()
    assert sum(counts) == 30
    assert len(receiver.received) == 30
    assert len({r.event_id for r in receiver.received}) == 30
    deliveries = await _deliveries(engine)
    assert {d.status for d in deliveries} == {DeliveryStatus.DELIVERED}


async def test_a_send_that_lost_its_lease_does_not_overwrite_the_newer_attempt(
    engine: Engine, clock: Clock, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    receiver.hang_s = 0.3
    await _notify(engine, receiver.url())
    first = asyncio.create_task(_run(engine, session))
    await receiver.arrived.wait()  # the first send is in flight
    clock.advance(CONFIG.lease_s + 1)  # its lease ends: another run claims it again
    receiver.answer_status = 500
    assert await _run(engine, session) == 1
    assert await first == 1
    (delivery,) = await _deliveries(engine)
    # The second claim's outcome (a 500) stands; the first send's "success", recorded
    # after it, was dropped: its claim was no longer the row's.
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1
    assert delivery.last_status_code == 500


async def test_deliveries_are_listed_newest_first_by_page_status_and_scope(
    engine: Engine, receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.secrets = [await _secret(engine)]
    for _ in range(3):
        await _notify(engine, receiver.url())
    await _run(engine, session)
    await _notify(engine, receiver.url())
    await _notify(engine, receiver.url(), scope="p2")
    first = await webhooks.list_deliveries(
        engine, scope="p1", status=None, limit=2, starting_after=None
    )
    assert first.has_more and len(first.deliveries) == 2
    rest = await webhooks.list_deliveries(
        engine, scope="p1", status=None, limit=2, starting_after=first.deliveries[-1].id
    )
    assert not rest.has_more and len(rest.deliveries) == 2
    ids = [d.id for d in (*first.deliveries, *rest.deliveries)]
    assert ids == sorted(ids, reverse=True)
    pending = await webhooks.list_deliveries(
        engine, scope="p1", status=DeliveryStatus.PENDING, limit=10, starting_after=None
    )
    assert [d.id for d in pending.deliveries] == [ids[0]]
    (theirs,) = await _deliveries(engine, scope="p2")
    with pytest.raises(InvalidCursor):
        await webhooks.list_deliveries(
            engine, scope="p1", status=None, limit=10, starting_after=theirs.id
        )


async def test_a_crash_mid_send_is_sent_again_after_a_restart_with_the_same_event_id(
    dsn: str, engine: Engine, clock: Clock, receiver: Receiver
) -> None:
    receiver.secrets = [await _secret(engine)]
    receiver.hang_s = 1.0
    event_id = await _notify(engine, receiver.url())
    async with dispatch.open_session(CONFIG) as session:
        crashed = asyncio.create_task(_run(engine, session))
        await receiver.arrived.wait()
        crashed.cancel()  # the process dies with the send in flight: nothing recorded
        with pytest.raises(asyncio.CancelledError):
            await crashed
    await engine.close()
    receiver.hang_s = 0.0
    restarted = await Engine.open(dsn, config=TEST_ENGINE_CONFIG, clock=clock)
    try:
        async with dispatch.open_session(CONFIG) as session:
            assert await _run(restarted, session) == 0, "still leased to the dead run"
            clock.advance(CONFIG.lease_s)
            assert await _run(restarted, session) == 1
        (delivery,) = await _deliveries(restarted)
    finally:
        await restarted.close()
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.attempts == 1
    assert [r.event_id for r in receiver.received] == [str(event_id)] * 2
    assert [r.headers["Txengine-Delivery-Attempt"] for r in receiver.received] == ["1", "1"]


async def test_the_dispatcher_loop_delivers_in_the_background(
    engine: Engine, receiver: Receiver
) -> None:
    receiver.secrets = [await _secret(engine)]
    seen: list[str] = []
    recorded = asyncio.Event()

    class Observer:
        def attempted(self, *, outcome: str, duration_s: float) -> None:
            seen.append(outcome)
            recorded.set()

    running = dispatch.Dispatcher(
        engine, config=DispatcherConfig(interval_s=0.02, timeout_s=2.0), observer=Observer()
    )
    running.start()
    try:
        await _notify(engine, receiver.url())
        await asyncio.wait_for(recorded.wait(), 10)
    finally:
        await running.stop()
    assert seen == ["delivered"]
    (delivery,) = await _deliveries(engine)
    assert delivery.status == DeliveryStatus.DELIVERED
