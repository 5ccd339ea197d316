"""Where a benchmark's CPU goes: CPU seconds spent by process groups (the server's
workers, PostgreSQL's backends, the load generator) over the measured window.

On a shared 2-core machine throughput drifts from run to run, but CPU time per
transfer of each part moves much less: it says what each part costs, and 2 cores
divided by the sum is the ceiling this machine can reach with that code.
Linux only (/proc); elsewhere the meter reports nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

_PROC = Path("/proc")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of user + system) of a live process, or None."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _all_stats() -> dict[int, tuple[int, float]]:
    stats: dict[int, tuple[int, float]] = {}
    if not _PROC.is_dir():
        return stats
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found is not None:
                stats[int(entry.name)] = found
    return stats


def _with_descendants(roots: Iterable[int], stats: Mapping[int, tuple[int, float]]) -> set[int]:
    members = {pid for pid in roots if pid in stats}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in members} - members
        members |= children
        grew = bool(children)
    return members


def child_pids(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (a supervisor's workers); one place
    for every bench and test that looks for them."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            children.add(int(entry.name))
    return children


class CpuMeter:
    """CPU seconds per group between start() and stop(); a group is its root pids and
    all their descendants (PostgreSQL's backends are children of the postmaster)."""

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        self._roots = {name: tuple(pids) for name, pids in groups.items()}
        self._start: dict[int, float] = {}
        self._started_at = 0.0

    def start(self) -> None:
        self._start = {pid: cpu for pid, (_, cpu) in _all_stats().items()}
        self._started_at = time.perf_counter()

    def stop(self) -> tuple[dict[str, float], float]:
        """CPU seconds per group, and the wall seconds they were measured over."""
        stats = _all_stats()
        wall_s = time.perf_counter() - self._started_at
        spent: dict[str, float] = {}
        for name, roots in self._roots.items():
            members = _with_descendants(roots, stats)
            spent[name] = sum(stats[pid][1] - self._start.get(pid, 0.0) for pid in members)
        return spent, wall_s
