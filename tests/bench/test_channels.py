"""The channel benchmark, bounded: every request ends once and the books balance."""

from __future__ import annotations

from banksim import SimConfig
from bench.channels import run_channels


async def test_a_small_channel_run_with_every_failure_on_balances(dsn: str) -> None:
    sim = SimConfig(latency_ms=5, failure_rate=0.2, silence_rate=0.1, duplicate_rate=0.2, seed=3)
    result = await run_channels(dsn, requests=60, concurrency=8, sim=sim, deadline_s=2)
    assert result["balances_ok"] and result["violations"] == 0, result
    assert sum(result["states"].values()) == 60
    assert not any(state.endswith(".pending") for state in result["states"]), result
    assert result["timed_out"] > 0 and result["bank"]["orders"] == 60
