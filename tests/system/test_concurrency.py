"""Many clients against a real two-worker server: money is conserved, every key applies at
most once, retries replay the first answer, and both workers take connections."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import uuid
from typing import Any, Literal

import aiohttp
import pytest

from tests.system.support import (
    CONNECTION_ERRORS,
    REQUEST_TIMEOUT_S,
    Answer,
    Ledger,
    ServerProcess,
    StartServer,
    check_transfers_exist,
    expected_balances,
    get_json,
    healthz_pids,
    open_ledger,
    parent_pid,
    post,
    post_until_definite,
    posted_balances,
    reconcile,
    signed_session,
    transfer_body,
    transfer_ids_in_database,
)

pytestmark = pytest.mark.slow

WORKERS = 2
USERS = 10
FUNDING_MINOR = 300  # per user: little enough that some transfers find too little money
TRANSFERS = 2_000
CLIENTS = 50
AMOUNT_MINOR_MAX = 50
RETRY_SHARE = 0.10  # sent again with the same key once answered
CUT_SHARE = 0.05  # abandoned mid-flight, then retried until answered
CUT_TIMEOUT_S = (0.001, 0.008)
LOAD_TIMEOUT_S = 90.0
RACE_CLIENTS = 50
RACE_ROUNDS = 5

Mode = Literal["once", "retry", "cut"]


@dataclasses.dataclass(frozen=True)
class Planned:
    key: str
    body: dict[str, Any]
    mode: Mode


@dataclasses.dataclass
class Outcome:
    answer: Answer  # the first definite answer the client saw
    replay: Answer | None = None  # for "retry": the answer to sending it again
    cut_answer: Answer | None = None  # for "cut": if the abandoned attempt was answered


def plan_transfers(rng: random.Random, ledger: Ledger) -> list[Planned]:
    plans = []
    for n in range(TRANSFERS):
        debit, credit = rng.sample(ledger.users, 2)
        draw = rng.random()
        mode: Mode = "once"
        if draw < CUT_SHARE:
            mode = "cut"
        elif draw < CUT_SHARE + RETRY_SHARE:
            mode = "retry"
        body = transfer_body(debit, credit, rng.randint(1, AMOUNT_MINOR_MAX))
        plans.append(Planned(key=f"load-{n}-{uuid.uuid4()}", body=body, mode=mode))
    return plans


async def run_client(
    base_url: str, plans: list[Planned], outcomes: dict[str, Outcome], rng: random.Random
) -> None:
    url = f"{base_url}/v1/transfers"
    async with signed_session() as session:
        for plan in plans:
            cut_answer = None
            if plan.mode == "cut":
                timeout = aiohttp.ClientTimeout(total=rng.uniform(*CUT_TIMEOUT_S))
                with contextlib.suppress(*CONNECTION_ERRORS):
                    cut_answer = await post(
                        session, url, plan.body, key=plan.key, client_timeout=timeout
                    )
                # Retry soon: sometimes while the abandoned attempt is still in flight.
                await asyncio.sleep(rng.uniform(0, 0.02))
            answer = await post_until_definite(session, url, plan.body, key=plan.key)
            outcome = Outcome(answer=answer, cut_answer=cut_answer)
            if plan.mode == "retry":
                outcome.replay = await post_until_definite(session, url, plan.body, key=plan.key)
            outcomes[plan.key] = outcome


def check_workers(server: ServerProcess, pids: set[int]) -> None:
    """The pids are distinct workers of this server (children of its supervisor)."""
    assert len(pids) == WORKERS, f"/healthz answered from {pids}: SO_REUSEPORT did not spread"
    for pid in pids:
        assert pid != server.pid
        assert parent_pid(pid) == server.pid, (pid, server.pid)


async def test_concurrent_transfers_conserve_money(start_server: StartServer, dsn: str) -> None:
    server = await start_server(workers=WORKERS)
    rng = random.Random(20_251_125)
    ledger = await open_ledger(server.url, users=USERS, funding_minor=FUNDING_MINOR)
    plans = plan_transfers(rng, ledger)

    outcomes: dict[str, Outcome] = {}
    shares = [plans[i::CLIENTS] for i in range(CLIENTS)]
    client_rngs = [random.Random(rng.random()) for _ in range(CLIENTS)]
    await asyncio.wait_for(
        asyncio.gather(
            *(
                run_client(server.url, share, outcomes, client_rng)
                for share, client_rng in zip(shares, client_rngs, strict=True)
            )
        ),
        timeout=LOAD_TIMEOUT_S,
    )
    assert len(outcomes) == TRANSFERS

    # Every answer is a ledger decision: created, or refused for want of money.
    by_status = collections.Counter(o.answer.status for o in outcomes.values())
    assert set(by_status) <= {201, 422}, by_status
    refused = [o.answer for o in outcomes.values() if o.answer.status == 422]
    assert {a.code for a in refused} <= {"insufficient_funds"}
    assert by_status[201] > 0 and by_status[422] > 0, by_status
    # A retry after an answer replays that answer, byte for byte.
    retried = [(p, outcomes[p.key]) for p in plans if p.mode == "retry"]
    assert retried
    for plan, outcome in retried:
        assert outcome.replay is not None
        assert outcome.replay.replayed, (plan.key, outcome)
        assert not outcome.answer.replayed, (plan.key, outcome)
        assert (outcome.replay.status, outcome.replay.body) == (
            outcome.answer.status,
            outcome.answer.body,
        ), plan.key
    # An abandoned attempt that was answered after all told the truth too.
    for plan in plans:
        cut_answer = outcomes[plan.key].cut_answer
        if cut_answer is not None and cut_answer.definite:
            answer = outcomes[plan.key].answer
            assert answer.replayed, plan.key
            assert (answer.status, answer.body) == (cut_answer.status, cut_answer.body), plan.key

    # Acknowledged transfers: each once, as requested, visible, and nothing else was made.
    plan_of = {p.key: p for p in plans}
    accepted: list[dict[str, Any]] = []
    for key, outcome in outcomes.items():
        if outcome.answer.status == 201:
            transfer = outcome.answer.json()
            for field in ("debit_account_id", "credit_account_id", "amount_minor"):
                assert transfer[field] == plan_of[key].body[field], (key, transfer)
            accepted.append(transfer)
    accepted_ids = [t["id"] for t in accepted]
    assert len(set(accepted_ids)) == len(accepted_ids), "two keys answered with one transfer"
    await check_transfers_exist(server.url, accepted)
    in_database = await transfer_ids_in_database(dsn)
    assert len(in_database) == len(accepted) + len(ledger.funding_transfer_ids)
    assert {str(i) for i in in_database} == set(accepted_ids) | set(ledger.funding_transfer_ids)

    # Money is conserved, nobody is overdrawn, and the balances are what the answers say.
    accounts = [ledger.system, *ledger.users]
    balances = await posted_balances(server.url, accounts)
    assert balances == expected_balances(ledger, accepted)
    assert sum(balances.values()) == 0
    assert sum(balances[u] for u in ledger.users) == ledger.funded_total_minor
    assert all(balances[u] >= 0 for u in ledger.users), balances

    code, output = await reconcile(dsn)
    assert code == 0, output

    check_workers(server, await healthz_pids(server.url, want=WORKERS))


async def test_one_key_racing_on_two_workers_applies_once(
    start_server: StartServer, dsn: str
) -> None:
    server = await start_server(workers=WORKERS)
    ledger = await open_ledger(server.url, users=2, funding_minor=1_000)
    payer, payee = ledger.users
    url = f"{server.url}/v1/transfers"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    sessions = [signed_session(timeout=timeout) for _ in range(RACE_CLIENTS)]
    try:
        # One open connection per client, so that the racing requests leave together;
        # between them the connections reach both workers.
        warm = await asyncio.gather(*(get_json(s, f"{server.url}/healthz") for s in sessions))
        check_workers(server, {body["pid"] for _, body in warm})

        created_ids = []
        for round_ in range(RACE_ROUNDS):
            key = f"race-{round_}-{uuid.uuid4()}"
            body = transfer_body(payer, payee, 10 + round_)
            answers = await asyncio.gather(*(post(s, url, body, key=key) for s in sessions))

            created = [a for a in answers if a.status == 201]
            in_flight = [a for a in answers if a.status != 201]
            assert created, answers
            assert {a.body for a in created} == {created[0].body}, "replays differ"
            assert [a.replayed for a in created].count(False) == 1, "applied more than once"
            for answer in in_flight:
                assert (answer.status, answer.code) == (409, "idempotency_key_in_flight"), answer

            final = await post_until_definite(sessions[0], url, body, key=key)
            assert (final.status, final.body, final.replayed) == (201, created[0].body, True)
            created_ids.append(created[0].json()["id"])

        in_database = await transfer_ids_in_database(dsn)
        assert sorted(str(i) for i in in_database) == sorted(
            created_ids + ledger.funding_transfer_ids
        )
        balances = await posted_balances(server.url, [payer, payee])
        moved = sum(10 + r for r in range(RACE_ROUNDS))
        assert balances == {payer: 1_000 - moved, payee: 1_000 + moved}
    finally:
        await asyncio.gather(*(s.close() for s in sessions))

    code, output = await reconcile(dsn)
    assert code == 0, output
