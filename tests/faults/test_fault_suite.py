"""The fault suite, short: every fault once, in a seeded order, under 16 clients.

The long run is `python -m bench.faults` (README, "Fault suite"). Assertions are on the
invariants the checker counts and on the harness having done its job (every fault
injected, work acknowledged, reads taken), never on timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults.nemesis import FAULT_KINDS, NemesisConfig
from bench.faults.run import RunConfig, run

pytestmark = pytest.mark.slow

SHORT_RUN = RunConfig(
    duration_s=8.0,
    clients=16,
    accounts=8,
    seed=20_251_125,
    workers=2,
    funding_minor=20,  # small, so that some transfers are refused for want of money
    hold_timeout_s=(1, 3),
    nemesis=NemesisConfig(
        interval_s=(0.5, 1.5),
        rounds=1,
        postgres_down_s=(1.0, 2.0),
        server_down_s=(0.2, 1.0),
        window_s=(1.0, 2.0),
        delay_s=(0.02, 0.1),
        stall_s=(2.5, 3.5),  # past the 2 s database timeout the server below runs with
    ),
    server_env={"TXENGINE_STATEMENT_TIMEOUT_MS": "1000"},
)


async def test_no_acknowledged_money_is_lost_doubled_or_stuck(tmp_path: Path) -> None:
    lines: list[str] = []
    config = RunConfig(**{**SHORT_RUN.__dict__, "workdir": tmp_path / "run"})
    report = await run(config, log=lines.append)
    rendered = "\n".join([*lines, report.render()])

    assert report.violations == 0, rendered
    assert set(report.faults) == set(FAULT_KINDS), rendered
    checked = {check.name: check.checked for check in report.checks}
    assert report.acknowledged_transfers > 0, rendered
    assert report.snapshots > 0 and report.reads > 0, rendered
    # Every check looked at something, except answers never seen: a short run may end
    # with none in flight.
    assert all(checked[name] > 0 for name in checked if "never answered" not in name), rendered
