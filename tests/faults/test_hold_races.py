"""Hold races: 1,000 holds, each hit at the moment it expires by a post and a void sent
at once, while the sweeper expires it too. Whatever wins, each hold resolves exactly
once: one of the three, with the answers, the hold's row and its entries agreeing.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from datetime import datetime
from typing import Final

import pytest

from bench.faults.client import Answer, Client
from bench.faults.cluster import Cluster
from bench.faults.workload import transfer_body
from tests.faults.support import definite, fetch, open_accounts, reconcile_passes

pytestmark = pytest.mark.slow

HOLDS: Final = 1_000
USERS: Final = 20
CREATE_CONCURRENCY: Final = 32
JITTER_S: Final = 0.3  # post and void go out within this of the hold's expiry
SWEEP_WAIT_S_MAX: Final = 60.0
REFUSALS: Final = {"pending_transfer_expired", "transfer_already_resolved"}


async def race_one(
    client: Client, users: list[str], rng: random.Random, n: int, gate: asyncio.Semaphore
) -> tuple[str, Answer, Answer]:
    debit, credit = rng.sample(users, 2)
    key = f"hold-{n}"
    body = {**transfer_body(debit, credit, rng.randint(1, 5), key), "pending": True}
    body["timeout_s"] = 1
    async with gate:
        made = await definite(client, "/v1/transfers", body, key=key)
    assert made.status == 201, made
    hold = made.json()
    expires_at = datetime.fromisoformat(hold["expires_at"]).timestamp()
    await asyncio.sleep(max(0.0, expires_at + rng.uniform(-JITTER_S, JITTER_S) - time.time()))
    path = f"/v1/transfers/{hold['id']}"
    posted, voided = await asyncio.gather(
        definite(client, f"{path}/post", {}, key=f"{key}-post"),
        definite(client, f"{path}/void", {}, key=f"{key}-void"),
    )
    return hold["id"], posted, voided


async def test_each_hold_resolves_exactly_once(cluster: Cluster, client: Client) -> None:
    users = await open_accounts(client, users=USERS, funding_minor=10_000)
    rng = random.Random(20_251_125)
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)
    races = await asyncio.gather(
        *(race_one(client, users, random.Random(rng.random()), n, gate) for n in range(HOLDS))
    )

    deadline = time.monotonic() + SWEEP_WAIT_S_MAX
    while await fetch(cluster, "SELECT id FROM transfers WHERE status = 'pending' LIMIT 1"):
        assert time.monotonic() < deadline, "holds still open long after their expiry"
        await asyncio.sleep(0.5)
    rows = await fetch(
        cluster,
        """SELECT t.id::text AS id, t.status, t.posted_amount_minor, t.amount_minor,
                  (SELECT count(*) FROM entries e WHERE e.transfer_id = t.id
                    AND e.kind IN ('post', 'void', 'expire')) AS resolutions
           FROM transfers t WHERE t.pending""",
    )
    holds = {row["id"]: row for row in rows}
    assert len(holds) == HOLDS

    winners: collections.Counter[str] = collections.Counter()
    for hold_id, posted, voided in races:
        row = holds[hold_id]
        assert row["resolutions"] == 2, (hold_id, row)  # one entry per account, once
        oks = [answer for answer in (posted, voided) if answer.status == 200]
        assert len(oks) <= 1, (hold_id, posted, voided)
        for answer in (posted, voided):
            assert answer.status == 200 or answer.code in REFUSALS, (hold_id, answer)
        if posted.status == 200:
            winner = "posted"
            assert row["posted_amount_minor"] == row["amount_minor"]
        elif voided.status == 200:
            winner = "voided"
        else:
            winner = "expired"
        assert row["status"] == winner, (hold_id, row, posted, voided)
        if winner != "posted":
            assert row["posted_amount_minor"] == 0
        winners[winner] += 1
    print(f"hold races won by: {dict(winners)}")

    (pending,) = await fetch(
        cluster,
        "SELECT sum(debits_pending)::bigint AS d, sum(credits_pending)::bigint AS c FROM accounts",
    )
    assert (pending["d"], pending["c"]) == (0, 0)
    await reconcile_passes(cluster)
