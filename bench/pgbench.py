"""pgbench's TPC-B-like run on the same server, as the yardstick for txengine's throughput.

A TPC-B transaction (three balance UPDATEs, one history INSERT, one SELECT, one commit)
is close in shape to a transfer, so "transfers/s as a share of pgbench tps" says how much
of what PostgreSQL can do on this machine the engine and its HTTP layer turn into
transfers.

pgbench runs in its own database, `pgbench`, dropped and re-initialised each run so every
run starts from the same tables. The client binaries run as whoever we are, root
included: only the server refuses root, and the embedded server accepts TCP connections
from 127.0.0.1 as the `postgres` role with trust auth whatever the OS user.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

PGBENCH_DATABASE = "pgbench"
INIT_TIMEOUT_S = 600.0  # scale 10 takes seconds; generous for slow disks
# pgbench runs until -T and then waits for its transactions to finish.
RUN_GRACE_S = 120.0
ADMIN_TIMEOUT_S = 60.0

# pgbench 14+ says "without initial connection time"; older ones "excluding connections
# establishing". Either way this is the tps of the measured period alone.
_TPS = re.compile(
    r"^tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)",
    re.M,
)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


class PgbenchError(RuntimeError):
    """A pgbench step failed; the message carries its output."""


@dataclasses.dataclass(frozen=True)
class PgbenchResult:
    tps: float  # without initial connection time
    latency_avg_ms: float
    transactions: int
    failed: int
    scale: int
    clients: int
    threads: int
    duration_s: float
    prepared: bool
    init_s: float  # wall time of pgbench -i, for the record
    output: str = dataclasses.field(repr=False, default="")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["output"]
        return out


def dsn_parts(dsn: str) -> dict[str, Any]:
    """host, port and user of a postgresql:// DSN, as run_tpcb takes them."""
    url = urllib.parse.urlsplit(dsn)
    return {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 5432,
        "user": urllib.parse.unquote(url.username or "postgres"),
    }


def parse_pgbench_output(output: str) -> tuple[float, float, int, int]:
    """(tps, latency_avg_ms, transactions, failed) from pgbench's summary."""
    tps = _TPS.search(output)
    latency = _LATENCY.search(output)
    processed = _PROCESSED.search(output)
    if tps is None or latency is None or processed is None:
        raise PgbenchError(f"cannot read pgbench's summary:\n{output}")
    failed = _FAILED.search(output)
    return (
        float(tps[1]),
        float(latency[1]),
        int(processed[1]),
        int(failed[1]) if failed else 0,
    )


def _run(bin_dir: Path, exe: str, args: list[str], *, timeout_s: float, os_user: str | None) -> str:
    # PG* variables could point the tools at another server or database: drop them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        [str(bin_dir / exe), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd="/",  # a different os_user may not be allowed into our working directory
        user=os_user,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise PgbenchError(f"{exe} {' '.join(args)} exited {result.returncode}:\n{output}")
    return output


def run_tpcb(
    *,
    bin_dir: Path,
    host: str = "127.0.0.1",
    port: int,
    user: str = "postgres",
    scale: int = 10,
    clients: int = 8,
    threads: int = 2,
    duration_s: float = 15,
    prepared: bool = True,
    keep_database: bool = False,
    os_user: str | None = None,
) -> PgbenchResult:
    """Initialise pgbench's tables at `scale` in a fresh database and run TPC-B on them.

    os_user runs the binaries as another OS user; not needed for the embedded server
    (see the module doc), kept for servers that use peer authentication.
    """
    conn = ["-h", host, "-p", str(port), "-U", user]

    def run(exe: str, args: list[str], timeout_s: float = ADMIN_TIMEOUT_S) -> str:
        return _run(bin_dir, exe, args, timeout_s=timeout_s, os_user=os_user)

    # --force: a pgbench killed mid-run may leave backends connected to the database.
    run("dropdb", [*conn, "--if-exists", "--force", PGBENCH_DATABASE])
    run("createdb", [*conn, PGBENCH_DATABASE])
    t0 = time.monotonic()
    run("pgbench", [*conn, "-i", "-q", "-s", str(scale), PGBENCH_DATABASE], INIT_TIMEOUT_S)
    init_s = time.monotonic() - t0
    args = [*conn, "-c", str(clients), "-j", str(threads), "-T", str(round(duration_s))]
    if prepared:
        args += ["-M", "prepared"]
    output = run("pgbench", [*args, PGBENCH_DATABASE], duration_s + RUN_GRACE_S)
    if not keep_database:
        # Its tables would otherwise share buffers and disk with whatever runs next.
        run("dropdb", [*conn, "--if-exists", "--force", PGBENCH_DATABASE])
    tps, latency_avg_ms, transactions, failed = parse_pgbench_output(output)
    return PgbenchResult(
        tps=tps,
        latency_avg_ms=latency_avg_ms,
        transactions=transactions,
        failed=failed,
        scale=scale,
        clients=clients,
        threads=threads,
        duration_s=duration_s,
        prepared=prepared,
        init_s=init_s,
        output=output,
    )
