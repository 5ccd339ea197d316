"""One run of the fault suite: start the cluster, open and fund accounts, run the
clients and the nemesis for the duration, heal, check, report."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from bench.faults import checker
from bench.faults.check import Check
from bench.faults.client import Client
from bench.faults.cluster import Cluster
from bench.faults.history import History, Outcome
from bench.faults.nemesis import RECOVERY_TIMEOUT_S, Nemesis, NemesisConfig
from bench.faults.workload import (
    CURRENCY,
    Workload,
    run_client,
    take_snapshots,
    transfer_body,
)

SETUP_CONCURRENCY: Final = 16
SETUP_RETRY_S_MAX: Final = 60.0
# After the run: how long clients may take to finish the attempt they are in.
CLIENTS_FINISH_S_MAX: Final = 60.0
FAULT_ROUNDS_S_MAX: Final = 600.0  # planned rounds of faults must be done within
SWEEPER_SLACK_S: Final = 20.0  # beyond the longest hold timeout, for the sweeper's rounds


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    duration_s: float = 600.0
    clients: int = 64
    accounts: int = 8
    merchants: int = 2  # the sellers of escrow trades (unfunded: trades pay them)
    seed: int = 1
    workers: int = 2
    funding_minor: int = 100  # per user account: little, so some transfers are refused
    hold_timeout_s: tuple[int, int] = (1, 8)
    nemesis: NemesisConfig = dataclasses.field(default_factory=NemesisConfig)
    server_env: dict[str, str] = dataclasses.field(default_factory=dict)
    workdir: Path | None = None  # None: a temporary folder, removed afterwards


@dataclasses.dataclass
class Report:
    config: RunConfig
    checks: list[Check]
    operations: dict[str, dict[str, int]]
    faults: dict[str, int]
    fault_log: list[str]
    snapshots: int
    reads: int
    elapsed_s: float

    @property
    def violations(self) -> int:
        return sum(check.violations for check in self.checks)

    @property
    def acknowledged_transfers(self) -> int:
        return self.operations.get("transfer", {}).get(Outcome.OK, 0)

    @property
    def acknowledged_trades(self) -> int:
        return self.operations.get("trade", {}).get(Outcome.OK, 0)

    @property
    def acknowledged_trade_steps(self) -> int:
        return sum(
            counts.get(Outcome.OK, 0)
            for kind, counts in self.operations.items()
            if kind.startswith("trade")
        )

    def render(self) -> str:
        lines = ["operations (kind: outcome counts):"]
        for kind, counts in self.operations.items():
            shown = ", ".join(f"{outcome} {n}" for outcome, n in sorted(counts.items()))
            lines.append(f"  {kind:<9} {shown}")
        total = sum(self.faults.values())
        shown = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items()))
        lines.append(f"faults injected: {total} ({shown})")
        lines.append(f"balance snapshots: {self.snapshots}, HTTP reads: {self.reads}")
        lines.append(checker.render(self.checks))
        lines.append(
            f"{self.violations} violations"
            f" ({self.acknowledged_transfers} transfers and {self.acknowledged_trades} trades"
            f" acknowledged, {self.elapsed_s:.0f} s)"
        )
        return "\n".join(lines)


async def setup_accounts(
    client: Client, *, run_id: str, users: int, merchants: int, funding_minor: int
) -> tuple[list[str], list[str], set[str]]:
    """A system account, `users` user accounts, each funded, and `merchants` merchant
    accounts (empty); the users' ids, the merchants' and the keys of the fundings."""
    deadline = time.monotonic() + SETUP_RETRY_S_MAX

    async def post(path: str, body: dict[str, Any], key: str) -> Any:
        while True:
            answer = await client.request("POST", path, body=body, key=key)
            if answer.definite:
                assert answer.status in (200, 201), (key, answer)
                return answer.json()
            assert time.monotonic() < deadline, f"setup: no answer for {key}: {answer}"
            await asyncio.sleep(0.1)

    opened = await post("/v1/accounts", {"currency": CURRENCY, "kind": "system"}, f"{run_id}-sys")
    system = opened["id"]
    ids: list[str] = [""] * users
    funding_keys = {f"{run_id}-fund-{i}" for i in range(users)}
    queue = collections.deque(range(users))

    async def worker() -> None:
        while queue:
            i = queue.popleft()
            body = {"currency": CURRENCY, "kind": "user"}
            ids[i] = (await post("/v1/accounts", body, f"{run_id}-user-{i}"))["id"]
            key = f"{run_id}-fund-{i}"
            await post("/v1/transfers", transfer_body(system, ids[i], funding_minor, key), key)

    await asyncio.gather(*(worker() for _ in range(SETUP_CONCURRENCY)))
    merchant_ids = [
        (await post("/v1/accounts", {"currency": CURRENCY, "kind": "merchant"}, key))["id"]
        for key in (f"{run_id}-merchant-{i}" for i in range(merchants))
    ]
    return ids, merchant_ids, funding_keys


async def _drain(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for tasks that stop by themselves once the run has ended."""
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=CLIENTS_FINISH_S_MAX)
    for task in done:
        task.result()  # a harness bug must not pass silently
    assert not pending, f"{len(pending)} tasks still busy {CLIENTS_FINISH_S_MAX} s after the end"


async def run(config: RunConfig, *, log: Callable[[str], None] = print) -> Report:
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="txengine-faults-"))
    cluster = Cluster(workdir=workdir, workers=config.workers, server_env=config.server_env)
    started = time.monotonic()
    log(
        f"fault suite: seed {config.seed}, {config.clients} clients, {config.accounts} accounts,"
        f" {config.duration_s:.0f} s, faults every {config.nemesis.interval_s} s, in {workdir}"
    )
    try:
        await cluster.start()
        async with Client(cluster.url, signer=cluster.signer) as client:
            assert await cluster.wait_ready(client, timeout_s=RECOVERY_TIMEOUT_S) is not None, (
                f"the server never became ready; see {cluster.log_path}"
            )
            return await _run_started(config, cluster, client, log=log, started=started)
    finally:
        await cluster.close()
        if config.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


async def _run_started(
    config: RunConfig,
    cluster: Cluster,
    client: Client,
    *,
    log: Callable[[str], None],
    started: float,
) -> Report:
    run_id = f"s{config.seed}"
    users, merchants, funding_keys = await setup_accounts(
        client,
        run_id=run_id,
        users=config.accounts,
        merchants=config.merchants,
        funding_minor=config.funding_minor,
    )
    total_minor = config.funding_minor * config.accounts
    log(f"{len(users)} accounts funded with {total_minor} in all; load and faults start")
    rng = random.Random(config.seed)
    history = History()
    stop = asyncio.Event()
    workload = Workload(
        client=client,
        history=history,
        users=users,
        merchants=merchants,
        deadline=float("inf"),  # until the run ends
        stop=stop,
        hold_timeout_s=config.hold_timeout_s,
    )
    nemesis = Nemesis(
        cluster=cluster,
        client=client,
        workload=workload,
        rng=random.Random(rng.random()),
        config=config.nemesis,
        log=log,
    )
    clients = [
        asyncio.create_task(run_client(workload, i, random.Random(rng.random()), run_id))
        for i in range(config.clients)
    ]
    snapshots = asyncio.create_task(take_snapshots(cluster.direct_dsn, history, stop))
    faults = asyncio.create_task(nemesis.run(stop))
    await asyncio.sleep(config.duration_s)
    if config.nemesis.rounds is not None:
        await asyncio.wait_for(asyncio.shield(faults), FAULT_ROUNDS_S_MAX)
    workload.deadline = time.monotonic()  # what is not answered by now stays unknown
    stop.set()
    await faults  # heals the fault in progress
    await _drain([*clients, snapshots])
    await _drain(list(workload.resolvers))  # after the clients: no client starts one now
    ready_at_end = await cluster.wait_ready(client, timeout_s=RECOVERY_TIMEOUT_S) is not None
    for op in history.ops.values():
        if op.outcome is Outcome.PENDING:
            op.outcome = Outcome.UNKNOWN
    checks = await checker.check_all(
        dsn=cluster.direct_dsn,
        env=dict(os.environ),
        history=history,
        nemesis=nemesis,
        total_minor=total_minor,
        setup_ops=funding_keys,
        holds_timeout_s=config.hold_timeout_s[1] + SWEEPER_SLACK_S,
        ready_at_end=ready_at_end,
    )
    return Report(
        config=config,
        checks=checks,
        operations=checker.summary(history),
        faults=dict(nemesis.counts()),
        fault_log=[f"{f.at_s} s {f.kind}: {f.detail}" for f in nemesis.faults],
        snapshots=len(history.snapshots),
        reads=len(history.reads),
        elapsed_s=time.monotonic() - started,
    )
