"""The table of the issue's six targets in RESULTS.md, one row each, kept current.

Each benchmark that measures a target calls `record_target` with `--record`; the row of
that target is replaced (the appended per-run logs below it keep the history).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final

from bench.harness import commit, machine, now_utc

RESULTS_FILE: Final = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN: Final = "<!-- targets:begin -->"
END: Final = "<!-- targets:end -->"

GOALS: Final = {
    1: ("throughput over HTTP", ">= 2.0x pgbench"),
    2: ("latency at 80% of max, open loop", "p99 <= 50 ms"),
    3: ("hot merchant", ">= 0.8x even"),
    4: ("engine alone, Python API", ">= 4x pgbench"),
    5: ("growth: 10M transfers in the tables", "within 15% of empty"),
    6: ("soak: 10 min at 1,300/s", "no errors, p99 flat, RSS within 10%"),
}

_HEADER: Final = (
    "| # | target | goal | measured | pgbench tps, same run | ratio | met | command "
    "| date | commit | machine |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetRow:
    number: int
    measured: str  # the figure, with its unit
    pgbench_tps: float | None
    ratio: str  # whatever the goal compares, e.g. "2.10x pgbench" or "0.92x even"
    met: bool | None  # None: not judged (a shortened run)
    command: str

    def cells(self, *, date: str, commit: str, machine: str) -> list[str]:
        name, goal = GOALS[self.number]
        met = {True: "yes", False: "**no**", None: "-"}[self.met]
        pgb = "-" if self.pgbench_tps is None else f"{self.pgbench_tps:,.0f}"
        return [
            str(self.number),
            name,
            goal,
            self.measured,
            pgb,
            self.ratio,
            met,
            f"`{self.command}`",
            date,
            commit,
            machine,
        ]


def _parse(table: str) -> dict[int, str]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = line
    return rows


def render(rows: dict[int, str]) -> str:
    body = ""
    for number in sorted(GOALS):
        if number in rows:
            body += rows[number] + "\n"
        else:
            name, goal = GOALS[number]
            body += f"| {number} | {name} | {goal} | not measured yet | | | | | | | |\n"
    return f"{BEGIN}\n{_HEADER}{body}{END}\n"


def record_target(row: TargetRow, *, path: Path = RESULTS_FILE) -> None:
    """Replace (or add) the row of `row.number` in the targets table of `path`."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    cells = row.cells(date=now_utc(), commit=commit(), machine=machine())
    line = "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        table, tail = rest.split(END, 1)
        rows = _parse(table)
        rows[row.number] = line
        text = head + render(rows) + "\n" + tail.lstrip("\n")
    else:
        section = "## The six targets (latest run of each)\n\n" + render({row.number: line}) + "\n"
        marker = "## Where things stand"
        text = (
            text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section
        )
    path.write_text(text)
