"""A single-process server stopped mid-load, by SIGKILL or by SIGTERM, then started again
on the same database; and one worker of two killed mid-load, which the supervisor replaces.

Clients record each key before sending it and each answer they get. After the restart,
every acknowledged transfer must still be there, every key sent again must give its first
answer or apply now, never twice, and the ledger must reconcile. On SIGTERM the server
must also answer what it had received and exit 0 within a few seconds.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.cpu import child_pids
from tests.system.support import (
    CONNECTION_ERRORS,
    Answer,
    Ledger,
    ServerProcess,
    StartServer,
    check_transfers_exist,
    expected_balances,
    healthz_pids,
    open_ledger,
    post_until_definite,
    posted_balances,
    reconcile,
    signed_session,
    transfer_body,
    transfer_ids_in_database,
)

pytestmark = pytest.mark.slow

USERS = 10
FUNDING_MINOR = 500  # per user: some transfers find too little money
AMOUNT_MINOR_MAX = 50
CLIENTS = 20
CHURNERS = 10
LOAD_BEFORE_SIGNAL_S = 2.0
REQUEST_TIMEOUT_S = 20.0
CLIENTS_STOP_TIMEOUT_S = 30.0
GRACEFUL_EXIT_S_MAX = 5.0
WORKER_REPLACED_S_MAX = 20.0
RETRY_CONCURRENCY = 20
ORPHANS_EXIT_S_MAX = 20.0


@dataclasses.dataclass
class Load:
    """What the clients sent and what came back, by idempotency key."""

    ledger: Ledger
    sent: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    body_sent_at: dict[str, float] = dataclasses.field(default_factory=dict)
    answers: dict[str, Answer] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # no answer: why
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def unsettled(self) -> list[str]:
        """Keys sent without a definite answer: lost in the stop, or told to retry."""
        return [k for k in self.sent if k not in self.answers or not self.answers[k].definite]


async def drive(base_url: str, load: Load, rng: random.Random, client: int) -> None:
    """Send transfers one after another until the server goes away or `load.stop`.

    Odd clients open a new connection for each request, even ones keep theirs open, so a
    stop finds both requests on open connections and connections not yet accepted.
    """

    async def on_chunk_sent(
        session: aiohttp.ClientSession,
        context: Any,
        params: aiohttp.TraceRequestChunkSentParams,
    ) -> None:
        load.body_sent_at[context.trace_request_ctx["key"]] = time.monotonic()

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_chunk_sent)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    url = f"{base_url}/v1/transfers"
    connector = aiohttp.TCPConnector(force_close=client % 2 == 1)
    async with signed_session(
        connector=connector, trace_configs=[trace], timeout=timeout
    ) as session:
        n = 0
        while not load.stop.is_set():
            key = f"restart-{client}-{n}"
            n += 1
            debit, credit = rng.sample(load.ledger.users, 2)
            body = transfer_body(debit, credit, rng.randint(1, AMOUNT_MINOR_MAX))
            load.sent[key] = body  # before sending: a key may be lost with the server
            try:
                async with session.post(
                    url, json=body, headers={"Idempotency-Key": key}, trace_request_ctx={"key": key}
                ) as response:
                    data = await response.read()
                    replayed = response.headers.get("Idempotent-Replayed") == "true"
            except CONNECTION_ERRORS as error:
                load.errors[key] = repr(error)
                return  # the server is gone, or going
            load.answers[key] = Answer(status=response.status, body=data, replayed=replayed)


def start_clients(base_url: str, load: Load) -> list[asyncio.Task[None]]:
    rng = random.Random(20_251_125)
    return [
        asyncio.create_task(drive(base_url, load, random.Random(rng.random()), i))
        for i in range(CLIENTS)
    ]


async def stop_clients(load: Load, clients: list[asyncio.Task[None]]) -> None:
    load.stop.set()
    try:
        await asyncio.wait_for(asyncio.gather(*clients), CLIENTS_STOP_TIMEOUT_S)
    finally:
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)


async def churn(base_url: str, load: Load) -> None:
    """GET /healthz on a new connection each time, until the server refuses connections
    or `load.stop`: connections are being accepted at every moment of a stop."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with signed_session(connector=connector, timeout=timeout) as session:
        while not load.stop.is_set():
            try:
                async with session.get(f"{base_url}/healthz") as response:
                    await response.read()
            except aiohttp.ClientConnectorError:
                return  # no longer listening
            except CONNECTION_ERRORS:
                pass  # cut off by the stop: fine for a request sent after the signal


async def load_then_signal(server: ServerProcess, load: Load, signum: signal.Signals) -> float:
    """Run the clients, send `signum` to the server mid-load, wait for it to exit and for
    the clients to stop; return the monotonic time just before the signal was sent."""
    clients = start_clients(server.url, load)
    clients += [asyncio.create_task(churn(server.url, load)) for _ in range(CHURNERS)]
    try:
        await asyncio.sleep(LOAD_BEFORE_SIGNAL_S)
        assert not any(c.done() for c in clients), "a client stopped before the signal"
        assert load.answers, "no answers before the signal"
        signalled_at = time.monotonic()
        server.send(signum)
        code = await server.wait_exit(timeout_s=GRACEFUL_EXIT_S_MAX)
        if signum is signal.SIGKILL:
            assert code == -signal.SIGKILL, code
        else:
            assert code == 0, f"exit code {code} on SIGTERM"
    finally:
        await stop_clients(load, clients)
    return signalled_at


async def retry_every_key_and_check(server: ServerProcess, load: Load, dsn: str) -> None:
    """Send every key again and check that the ledger saw each at most once."""
    settled: dict[str, Answer] = {}
    replays: dict[str, Answer] = {}
    unsettled = set(load.unsettled())
    queue = list(load.sent)

    async def retrier(session: aiohttp.ClientSession) -> None:
        url = f"{server.url}/v1/transfers"
        while queue:
            key = queue.pop()
            answer = await post_until_definite(session, url, load.sent[key], key=key)
            if key in unsettled:
                settled[key] = answer
            else:
                replays[key] = answer

    async with signed_session() as session:
        await asyncio.gather(*(retrier(session) for _ in range(RETRY_CONCURRENCY)))

    # Answers given before the stop were durable: the same key gives them back.
    for key, replay in replays.items():
        first = load.answers[key]
        assert replay.replayed, (key, first, replay)
        assert (replay.status, replay.body) == (first.status, first.body), key

    final = {**{k: load.answers[k] for k in replays}, **settled}
    assert final.keys() == load.sent.keys()
    by_status = collections.Counter(a.status for a in final.values())
    assert set(by_status) <= {201, 422}, by_status
    assert {a.code for a in final.values() if a.status == 422} <= {"insufficient_funds"}

    accepted = [a.json() for a in final.values() if a.status == 201]
    accepted_ids = [t["id"] for t in accepted]
    for key, answer in final.items():
        if answer.status == 201:
            transfer = answer.json()
            for field in ("debit_account_id", "credit_account_id", "amount_minor"):
                assert transfer[field] == load.sent[key][field], (key, transfer)
    assert len(set(accepted_ids)) == len(accepted_ids), "two keys answered with one transfer"
    await check_transfers_exist(server.url, accepted)

    # Applied at most once: one row per key answered 201, and no other row.
    ledger = load.ledger
    in_database = await transfer_ids_in_database(dsn)
    assert len(in_database) == len(accepted) + len(ledger.funding_transfer_ids)
    assert {str(i) for i in in_database} == set(accepted_ids) | set(ledger.funding_transfer_ids)

    balances = await posted_balances(server.url, [ledger.system, *ledger.users])
    assert balances == expected_balances(ledger, accepted)
    assert sum(balances[u] for u in ledger.users) == ledger.funded_total_minor
    assert all(balances[u] >= 0 for u in ledger.users), balances

    code, output = await reconcile(dsn)
    assert code == 0, output


async def test_sigkill_mid_load_loses_no_acknowledged_transfer(
    start_server: StartServer, dsn: str
) -> None:
    server = await start_server(workers=1)
    load = Load(ledger=await open_ledger(server.url, users=USERS, funding_minor=FUNDING_MINOR))

    await load_then_signal(server, load, signal.SIGKILL)
    assert load.errors, "the kill did not cut any request off"

    restarted = await start_server(workers=1, port=server.port)
    await retry_every_key_and_check(restarted, load, dsn)


async def test_sigterm_mid_load_answers_what_it_received(
    start_server: StartServer, dsn: str
) -> None:
    server = await start_server(workers=1)
    load = Load(ledger=await open_ledger(server.url, users=USERS, funding_minor=FUNDING_MINOR))

    signalled_at = await load_then_signal(server, load, signal.SIGTERM)

    # A request whose body was on its way before the signal was received before the server
    # began to stop, so it gets an answer: its connection is not reset.
    cut_off = {
        key: (error, signalled_at - load.body_sent_at[key])
        for key, error in load.errors.items()
        if key in load.body_sent_at and load.body_sent_at[key] < signalled_at
    }
    assert not cut_off, f"requests sent before SIGTERM got no answer: {cut_off}"

    restarted = await start_server(workers=1, port=server.port)
    await retry_every_key_and_check(restarted, load, dsn)


async def test_sigkill_of_a_worker_mid_load_is_replaced(
    start_server: StartServer, dsn: str
) -> None:
    server = await start_server(workers=2)
    workers = child_pids(server.pid)
    assert len(workers) == 2, workers
    load = Load(ledger=await open_ledger(server.url, users=USERS, funding_minor=FUNDING_MINOR))

    clients = start_clients(server.url, load)
    try:
        await asyncio.sleep(LOAD_BEFORE_SIGNAL_S)
        assert load.answers, "no answers before the signal"
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)

        # The supervisor starts another worker on the same port, and it takes connections.
        deadline = time.monotonic() + WORKER_REPLACED_S_MAX
        while len(replacements := child_pids(server.pid) - workers) < 1:
            assert time.monotonic() < deadline, "the supervisor did not replace the worker"
            await asyncio.sleep(0.05)
        (replacement,) = replacements
        while replacement not in await healthz_pids(server.url, want=2):
            assert time.monotonic() < deadline, "the new worker takes no connections"
            await asyncio.sleep(0.1)
        assert child_pids(server.pid) == workers - {victim} | {replacement}
    finally:
        await stop_clients(load, clients)
    assert server.returncode() is None, "the supervisor exited"

    await retry_every_key_and_check(server, load, dsn)


async def test_workers_stop_when_the_supervisor_is_killed(start_server: StartServer) -> None:
    """kill -9 of serve alone: its workers must not go on serving the port unsupervised
    (beside the workers of the next serve); they notice and shut down gracefully."""
    server = await start_server(workers=2)
    workers = child_pids(server.pid)
    assert len(workers) == 2, workers
    await server.kill()  # the supervisor only, not its process group

    deadline = time.monotonic() + ORPHANS_EXIT_S_MAX
    while alive := {pid for pid in workers if _is_running(pid)}:
        assert time.monotonic() < deadline, f"workers {alive} outlived their supervisor"
        await asyncio.sleep(0.1)


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
