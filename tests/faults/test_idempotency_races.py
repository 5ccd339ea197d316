"""Idempotency races: 100 concurrent copies of one request under one key, spread over
two gateway processes. One effect, and every copy gets the same answer (a copy that
arrives while the first is in flight is told 409 and sends again, as a partner would).
"""

from __future__ import annotations

import asyncio
from typing import Final

import pytest

from bench.faults.client import Answer, Client
from bench.faults.cluster import Cluster
from bench.faults.workload import transfer_body
from tests.faults.support import definite, fetch, open_accounts, reconcile_passes

pytestmark = pytest.mark.slow

COPIES: Final = 100


async def copies(client: Client, path: str, body: dict[str, object], key: str) -> list[Answer]:
    return await asyncio.gather(*(definite(client, path, body, key=key) for _ in range(COPIES)))


def assert_identical(answers: list[Answer], status: int) -> None:
    first = answers[0]
    assert first.status == status, first
    for answer in answers:
        assert (answer.status, answer.body) == (first.status, first.body)
    assert sum(1 for answer in answers if not answer.replayed) <= 1


async def test_hundred_copies_of_one_transfer_move_money_once(
    cluster: Cluster, client: Client
) -> None:
    debit, credit = await open_accounts(client, users=2, funding_minor=1_000)
    body = transfer_body(debit, credit, 7, "race")
    assert_identical(await copies(client, "/v1/transfers", body, "race"), 201)

    rows = await fetch(cluster, "SELECT id FROM transfers WHERE metadata->>'op' = 'race'")
    assert len(rows) == 1
    balances = await fetch(
        cluster,
        "SELECT id::text AS id, credits_posted - debits_posted AS posted FROM accounts"
        " WHERE id = ANY($1::bigint[])",
        [int(debit), int(credit)],
    )
    assert {row["id"]: row["posted"] for row in balances} == {debit: 993, credit: 1_007}
    await reconcile_passes(cluster)


async def test_hundred_copies_of_one_post_resolve_the_hold_once(
    cluster: Cluster, client: Client
) -> None:
    debit, credit = await open_accounts(client, users=2, funding_minor=1_000)
    body = {**transfer_body(debit, credit, 9, "hold"), "pending": True}
    hold = (await definite(client, "/v1/transfers", body, key="hold")).json()
    path = f"/v1/transfers/{hold['id']}/post"
    answers = await copies(client, path, {"amount_minor": 4}, "post-race")
    assert_identical(answers, 200)
    assert answers[0].json()["posted_amount_minor"] == 4

    resolutions = await fetch(
        cluster,
        "SELECT kind FROM entries WHERE transfer_id = $1 AND kind <> 'hold'",
        int(hold["id"]),
    )
    assert [row["kind"] for row in resolutions] == ["post", "post"]  # one per account
    await reconcile_passes(cluster)
