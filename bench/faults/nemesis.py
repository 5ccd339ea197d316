"""The faults, one at a time at random moments, chosen from a seeded generator and
printed as they happen, each healed before the next:

* kill_worker: SIGKILL one gateway worker; the supervisor must start another.
* kill_server: SIGKILL the supervisor and its workers at once, then start it again.
* kill_supervisor: SIGKILL the supervisor alone, then start it again; its orphaned
  workers must notice, finish what they hold and exit, beside the new ones.
* kill_postgres: SIGKILL the postmaster, keep it down a while, start it again on the
  same data directory. Meanwhile /readyz must answer a clear 503 `unavailable` problem
  (never hang); afterwards the gateway must become ready again by itself.
* drop_clients: for a while, clients give up on half their requests right after
  sending them (the server may still apply them) and send them again.
* slow_db: the proxy delays every chunk between gateway and PostgreSQL.
* stall_db: the proxy passes nothing on for longer than the gateway's database timeouts,
  so requests time out inside the gateway; then it cuts every connection.
* cut_db: the proxy resets every connection between gateway and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from collections.abc import Callable
from typing import Final

from bench.faults.client import Client
from bench.faults.cluster import READY_PROBE_TIMEOUT_S, Cluster
from bench.faults.workload import Workload

FAULT_KINDS: Final = (
    "kill_worker",
    "kill_server",
    "kill_supervisor",
    "kill_postgres",
    "drop_clients",
    "slow_db",
    "stall_db",
    "cut_db",
)
RECOVERY_TIMEOUT_S: Final = 60.0  # after a fault is healed, the gateway is ready within
READY_PROBE_INTERVAL_S: Final = 0.5
BACKENDS_EXIT_S: Final = 0.3
# A probe must be answered within this: READY_TIMEOUT_S (2 s) inside the gateway and some.
READY_ANSWER_S_MAX: Final = READY_PROBE_TIMEOUT_S


@dataclasses.dataclass(frozen=True, kw_only=True)
class NemesisConfig:
    interval_s: tuple[float, float] = (5.0, 30.0)  # quiet time before each fault
    kinds: tuple[str, ...] = FAULT_KINDS
    postgres_down_s: tuple[float, float] = (1.0, 5.0)
    server_down_s: tuple[float, float] = (0.2, 2.0)
    window_s: tuple[float, float] = (3.0, 10.0)  # how long drop_clients and slow_db last
    delay_s: tuple[float, float] = (0.02, 0.3)  # slow_db: per chunk
    stall_s: tuple[float, float] = (7.0, 10.0)  # longer than the gateway's 6 s timeout
    # None: kinds drawn at random until the run ends. N: N passes over every kind, each
    # in a seeded shuffled order, then stop (a short run that must see every fault).
    rounds: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        assert not unknown, f"unknown fault kinds {sorted(unknown)}"


@dataclasses.dataclass
class Fault:
    kind: str
    at_s: float  # since the run started
    detail: str = ""
    recovered_s: float | None = None  # until /readyz answered 200 after healing


@dataclasses.dataclass
class Readiness:
    """What /readyz answered while PostgreSQL was down."""

    probes: int = 0
    clear: int = 0  # a 503 problem document with code `unavailable`, in time
    hung: int = 0  # no answer within READY_ANSWER_S_MAX
    refused: int = 0  # no connection: the worker behind it was being replaced
    other: list[str] = dataclasses.field(default_factory=list)


class Nemesis:
    def __init__(
        self,
        *,
        cluster: Cluster,
        client: Client,
        workload: Workload,
        rng: random.Random,
        config: NemesisConfig,
        log: Callable[[str], None],
    ) -> None:
        self._cluster = cluster
        self._client = client
        self._workload = workload
        self._rng = rng
        self._config = config
        self._log = log
        self._started = time.monotonic()
        self.faults: list[Fault] = []
        self.readiness = Readiness()
        self.not_recovered: list[Fault] = []

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(fault.kind for fault in self.faults)

    async def run(self, stop: asyncio.Event) -> None:
        """Inject faults until `stop` (or the planned rounds are done); each is healed
        before the next and before return."""
        config = self._config
        plan = None
        if config.rounds is not None:
            kinds = config.kinds
            plan = [k for _ in range(config.rounds) for k in self._rng.sample(kinds, len(kinds))]
        while not stop.is_set() and plan != []:
            pause_s = self._rng.uniform(*self._config.interval_s)
            try:
                await asyncio.wait_for(stop.wait(), pause_s)
                return
            except TimeoutError:
                pass
            kind = plan.pop(0) if plan is not None else self._rng.choice(config.kinds)
            fault = Fault(kind=kind, at_s=round(time.monotonic() - self._started, 1))
            self.faults.append(fault)
            await getattr(self, f"_{kind}")(fault)
            fault.recovered_s = await self._cluster.wait_ready(
                self._client, timeout_s=RECOVERY_TIMEOUT_S
            )
            if fault.recovered_s is None:
                self.not_recovered.append(fault)
            recovered = "NOT READY" if fault.recovered_s is None else f"{fault.recovered_s:.1f} s"
            wall = time.strftime("%H:%M:%S", time.gmtime())
            self._log(
                f"[{fault.at_s:7.1f} s, {wall} UTC] {kind:<13} {fault.detail};"
                f" ready again: {recovered}"
            )

    async def _kill_worker(self, fault: Fault) -> None:
        pids = self._cluster.worker_pids()
        if not pids:
            fault.detail = "no worker to kill"
            return
        victim = self._rng.choice(pids)
        self._cluster.kill_worker(victim)
        fault.detail = f"SIGKILL worker {victim}"

    async def _kill_server(self, fault: Fault) -> None:
        down_s = self._rng.uniform(*self._config.server_down_s)
        pid = self._cluster.server_pid
        self._cluster.kill_server()
        await asyncio.sleep(down_s)
        self._cluster.start_server()
        fault.detail = f"SIGKILL supervisor {pid} and its workers, down {down_s:.1f} s"

    async def _kill_supervisor(self, fault: Fault) -> None:
        down_s = self._rng.uniform(*self._config.server_down_s)
        pid = self._cluster.server_pid
        self._cluster.kill_supervisor()
        await asyncio.sleep(down_s)
        self._cluster.start_server()
        fault.detail = f"SIGKILL supervisor {pid} alone, down {down_s:.1f} s"

    async def _kill_postgres(self, fault: Fault) -> None:
        down_s = self._rng.uniform(*self._config.postgres_down_s)
        pid = self._cluster.postgres.pid
        await self._cluster.kill_postgres()
        # Orphaned backends exit as soon as they see the postmaster gone; until then one
        # could still answer a probe, which says nothing about the gateway.
        await asyncio.sleep(BACKENDS_EXIT_S)
        deadline = time.monotonic() + down_s
        while time.monotonic() < deadline:
            await self._probe_readiness()
            await asyncio.sleep(READY_PROBE_INTERVAL_S)
        await self._cluster.start_postgres()
        fault.detail = f"SIGKILL postmaster {pid}, down {down_s:.1f} s"

    async def _probe_readiness(self) -> None:
        """/readyz while the database is down: a prompt 503 `unavailable` problem."""
        readiness = self.readiness
        readiness.probes += 1
        started = time.monotonic()
        answer = await self._client.request("GET", "/readyz", timeout_s=READY_ANSWER_S_MAX)
        if answer.status == 0 and time.monotonic() - started >= READY_ANSWER_S_MAX:
            readiness.hung += 1
        elif answer.status == 0:
            readiness.refused += 1  # not a hang: no process listened for a moment
        elif answer.status == 503 and answer.code == "unavailable":
            readiness.clear += 1
        else:
            readiness.other.append(f"{answer.status} {answer.body[:200]!r}")

    async def _drop_clients(self, fault: Fault) -> None:
        window_s = self._rng.uniform(*self._config.window_s)
        self._workload.drop_probability = 0.5
        await asyncio.sleep(window_s)
        self._workload.drop_probability = 0.0
        fault.detail = f"clients drop half their requests for {window_s:.1f} s"

    async def _slow_db(self, fault: Fault) -> None:
        proxy = self._cluster.proxy
        assert proxy is not None
        window_s = self._rng.uniform(*self._config.window_s)
        proxy.delay_s = self._rng.uniform(*self._config.delay_s)
        await asyncio.sleep(window_s)
        delay_ms = proxy.delay_s * 1000
        fault.detail = f"database {delay_ms:.0f} ms slower per chunk for {window_s:.1f} s"
        proxy.heal()

    async def _stall_db(self, fault: Fault) -> None:
        proxy = self._cluster.proxy
        assert proxy is not None
        stall_s = self._rng.uniform(*self._config.stall_s)
        proxy.stall()
        await asyncio.sleep(stall_s)
        cut = proxy.cut()
        proxy.heal()
        fault.detail = f"database connections stalled {stall_s:.1f} s, then {cut} cut"

    async def _cut_db(self, fault: Fault) -> None:
        proxy = self._cluster.proxy
        assert proxy is not None
        fault.detail = f"{proxy.cut()} database connections reset"
