"""The targets table in RESULTS.md: one row per target, replaced on re-recording; and
the soak's verdict."""

from __future__ import annotations

from pathlib import Path

from bench.soak import judge
from bench.targets import BEGIN, END, GOALS, TargetRow, record_target


def _row(number: int, measured: str) -> TargetRow:
    return TargetRow(
        number=number,
        measured=measured,
        pgbench_tps=4321.0,
        ratio="1.50x pgbench",
        met=False,
        command="python -m bench.x --a | b",
    )


def _table(path: Path) -> list[str]:
    text = path.read_text()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]


def test_record_target_inserts_then_replaces_one_row(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nintro\n\n## Where things stand\n\nold rows\n")
    record_target(_row(4, "9,000 transfers/s"), path=path)
    rows = _table(path)
    assert len(rows) == len(GOALS) == 6
    assert "9,000 transfers/s" in rows[3] and "4,321" in rows[3] and "**no**" in rows[3]
    assert "not measured yet" in rows[0]
    assert "\\|" in rows[3]  # a pipe in the command cannot break the table
    text = path.read_text()
    assert text.index(BEGIN) < text.index("## Where things stand") and "old rows" in text
    record_target(_row(4, "12,000 transfers/s"), path=path)
    record_target(_row(2, "p99 9 ms"), path=path)
    rows = _table(path)
    assert len(rows) == 6
    assert "12,000" in rows[3] and "9,000" not in path.read_text()
    assert "p99 9 ms" in rows[1]
    assert path.read_text().count(BEGIN) == 1


def test_soak_verdict() -> None:
    flat = [{"p99_ms": 10.0}, {"p99_ms": 11.0}, {"p99_ms": 12.0}]
    assert judge(flat, [100_000, 100_500, 104_000], errors=0)["met"]
    assert not judge(flat, [100_000, 104_000], errors=1)["met"]
    assert not judge(flat, [100_000, 111_000], errors=0)["rss_ok"]
    rising = [{"p99_ms": 10.0}, {"p99_ms": 30.0}]
    assert not judge(rising, [1, 1], errors=0)["p99_flat"]
    # A small p99 may move by a few milliseconds and still count as flat.
    assert judge([{"p99_ms": 2.0}, {"p99_ms": 6.0}], [1, 1], errors=0)["p99_flat"]
