"""Risk rules over HTTP: each refusal's problem type, that nothing moved, that it was
recorded and counted; and the step-up flow: 202, the code by (simulated) SMS only, right
code, wrong code, too many attempts, expiry, replays."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from engine.risk import STEP_UP_ATTEMPTS_MAX, STEP_UP_TTL_S
from tests.engine.test_engine import Clock
from tests.gateway.support import (
    UNKNOWN_ID,
    Api,
    World,
    assert_problem,
    make_world,
    serving,
    validate_response,
)

CONFIRM = "/v1/step-ups/{step_up_id}/confirm"


async def results_counted(api: Api, code: str) -> float:
    text = (await api.get("/metrics")).body.decode()
    match = re.search(rf'txengine_command_results_total{{result="{code}"}} ([0-9.e+]+)', text)
    return float(match[1]) if match else 0.0


async def moved(api: Api, world: World) -> dict[str, Any]:
    """What a refused request must leave as it was."""
    counts = await api.counts()
    del counts["keys"]  # a refused request's key keeps its answer
    return {
        **counts,
        "user": await api.balance(world.user),
        "merchant": await api.balance(world.merchant),
    }


@pytest.mark.parametrize(
    ("limits", "amount", "status", "code", "retry_after"),
    [
        ({"max_per_transfer_minor": 100}, 101, 422, "risk_transfer_limit", False),
        ({"daily_outflow_max_minor": 300}, 301, 422, "risk_daily_outflow_limit", True),
        ({"velocity_max_per_minute": 0}, 1, 422, "risk_velocity_limit", True),
        ("frozen", 1, 403, "account_frozen", False),
    ],
)
async def test_each_refusal_has_its_problem_moves_nothing_and_is_recorded_and_counted(
    api: Api,
    world: World,
    limits: dict[str, int] | str,
    amount: int,
    status: int,
    code: str,
    retry_after: bool,
) -> None:
    if limits == "frozen":
        await api.freeze(world.user)
    else:
        assert isinstance(limits, dict)
        await api.set_account_rules(world.user, **limits)
    before, counted = await moved(api, world), await results_counted(api, code)
    reply = await api.post("/v1/transfers", world.transfer(amount_minor=amount), key=f"k-{code}")
    body = assert_problem(reply, status, code)
    validate_response("POST", "/v1/transfers", reply)
    if retry_after:
        assert 1 <= body["retry_after_s"] <= 86_400
        assert reply.headers["Retry-After"] == str(body["retry_after_s"])
    else:
        assert "retry_after_s" not in body and "Retry-After" not in reply.headers
    assert await moved(api, world) == before
    (refusal,) = await api.refusals()
    assert refusal["code"] == code and refusal["idempotency_key"] == f"k-{code}"
    assert refusal["account_id"] == int(world.user) and refusal["reason"] == body["detail"]
    assert await results_counted(api, code) == counted + 1
    again = await api.post("/v1/transfers", world.transfer(amount_minor=amount), key=f"k-{code}")
    assert again.headers["Idempotent-Replayed"] == "true" and again.body == reply.body
    assert len(await api.refusals()) == 1


async def test_a_group_fails_whole_on_a_risk_refusal(api: Api, world: World) -> None:
    await api.set_account_rules(world.user, daily_outflow_max_minor=150)
    before = await moved(api, world)
    reply = await api.post(
        "/v1/transfer_groups", {"transfers": [world.transfer(), world.transfer()]}
    )
    body = assert_problem(reply, 422, "risk_daily_outflow_limit")
    assert body["failed_index"] == 1
    assert await moved(api, world) == before


async def start_step_up(api: Api, world: World, amount: int = 5_000, **kw: Any) -> dict[str, Any]:
    reply = await api.post("/v1/transfers", world.transfer(amount_minor=amount), **kw)
    assert reply.status == 202, reply
    validate_response("POST", "/v1/transfers", reply)
    body: dict[str, Any] = reply.json
    return body


async def confirm(api: Api, step_up_id: str, code: str, **kw: Any) -> Any:
    reply = await api.post(f"/v1/step-ups/{step_up_id}/confirm", {"code": code}, **kw)
    validate_response("POST", CONFIRM, reply)
    return reply


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


async def test_step_up_moves_money_only_with_the_right_code_and_only_once(
    api: Api, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await api.set_account_rules(world.user, step_up_threshold_minor=1_000)
    assert (await api.move(world.user, world.merchant, 1_000)).status == 201  # at the threshold
    before = await moved(api, world)
    step_up = await start_step_up(api, world, key="pay-big")
    assert step_up["account_id"] == world.user and step_up["attempts_max"] == STEP_UP_ATTEMPTS_MAX
    assert step_up["confirm_url"] == f"/v1/step-ups/{step_up['id']}/confirm"
    assert await moved(api, world) == before  # nothing moved
    again = await start_step_up(api, world, key="pay-big")  # same key: the same challenge
    assert again == step_up
    code = await api.step_up_code(step_up["id"])
    async with api.engine.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM step_up_outbox") == 1

    refused = await confirm(api, step_up["id"], wrong(code))
    body = assert_problem(refused, 422, "step_up_code_invalid")
    assert body["attempts_left"] == STEP_UP_ATTEMPTS_MAX - 1
    assert await moved(api, world) == before

    done = await confirm(api, step_up["id"], code, key="confirm-1")
    assert done.status == 201 and done.json["amount_minor"] == 5_000
    assert done.json["status"] == "posted"
    assert (await api.balance(world.user))["posted_minor"] == 10_000 - 1_000 - 5_000
    replay = await confirm(api, step_up["id"], code, key="confirm-1")
    assert replay.status == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.body == done.body
    assert_problem(
        await confirm(api, step_up["id"], code, key="confirm-2"), 409, "step_up_already_confirmed"
    )
    assert (await api.balance(world.user))["posted_minor"] == 4_000  # moved once

    # The code travels only by SMS: never in an answer, never in a log line.
    for reply in (refused, done, replay):
        assert code.encode() not in reply.body
    assert code not in str(step_up)
    assert all(code not in record.getMessage() for record in caplog.records)
    refusals = await api.refusals(world.user)
    assert [r["code"] for r in refusals] == ["step_up_code_invalid"]


async def test_step_up_dies_after_too_many_wrong_codes(api: Api, world: World) -> None:
    await api.set_account_rules(world.user, step_up_threshold_minor=0)
    before = await moved(api, world)
    step_up = await start_step_up(api, world, amount=1)
    code = await api.step_up_code(step_up["id"])
    lefts = []
    for _ in range(STEP_UP_ATTEMPTS_MAX):
        body = assert_problem(
            await confirm(api, step_up["id"], wrong(code)), 422, "step_up_code_invalid"
        )
        lefts.append(body["attempts_left"])
    assert lefts == list(range(STEP_UP_ATTEMPTS_MAX - 1, -1, -1))
    assert_problem(await confirm(api, step_up["id"], code), 410, "step_up_attempts_exceeded")
    assert await moved(api, world) == before
    async with api.engine.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT status, attempts FROM step_up_challenges WHERE id = $1", int(step_up["id"])
        )
    assert (row["status"], row["attempts"]) == ("locked", STEP_UP_ATTEMPTS_MAX)
    recorded = [r["code"] for r in await api.refusals(world.user)]
    assert recorded == ["step_up_code_invalid"] * STEP_UP_ATTEMPTS_MAX + [
        "step_up_attempts_exceeded"
    ]


async def test_step_up_expires(dsn: str) -> None:
    clock = Clock()
    async with serving(dsn, clock=clock) as api:
        world = await make_world(api)
        await api.set_account_rules(world.user, step_up_threshold_minor=0)
        step_up = await start_step_up(api, world, amount=1)
        expires_at = datetime.fromisoformat(step_up["expires_at"])
        assert (expires_at - clock.now).total_seconds() == STEP_UP_TTL_S
        code = await api.step_up_code(step_up["id"])
        before = await moved(api, world)
        clock.advance(STEP_UP_TTL_S)
        assert_problem(await confirm(api, step_up["id"], code), 410, "step_up_expired")
        assert await moved(api, world) == before
        assert [r["code"] for r in await api.refusals()] == ["step_up_expired"]
        assert clock.now.tzinfo is UTC


async def test_confirm_refuses_bad_codes_and_unknown_step_ups(api: Api, world: World) -> None:
    for code in ("12345", "1234567", "123456\n", "12345a", "١٢٣٤٥٦", 123456):
        reply = await api.post(f"/v1/step-ups/{UNKNOWN_ID}/confirm", {"code": code})
        assert_problem(reply, 400, "validation_error")
    assert_problem(await confirm(api, UNKNOWN_ID, "123456"), 404, "step_up_not_found")
    reply = await api.post("/v1/step-ups/x/confirm", {"code": "123456"})
    assert_problem(reply, 404, "step_up_not_found")
