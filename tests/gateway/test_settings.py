"""History settings from the environment reach the sweeper's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import from_env


def test_history_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TXENGINE_PARTITION_SPAN_DAYS", "1")
    monkeypatch.setenv("TXENGINE_HISTORY_RETENTION_DAYS", "30")
    monkeypatch.setenv("TXENGINE_ARCHIVE_DIR", str(tmp_path))
    history = from_env().sweeper_config().history
    assert history is not None
    assert (history.partition_span_days, history.retention_days) == (1, 30)
    assert history.archive_dir == tmp_path.resolve()


def test_history_defaults_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PARTITION_SPAN_DAYS", "HISTORY_RETENTION_DAYS", "ARCHIVE_DIR"):
        monkeypatch.delenv(f"TXENGINE_{name}", raising=False)
    history = from_env().sweeper_config().history
    assert history is not None
    assert (history.partition_span_days, history.retention_days) == (7, 90)
    assert history.archive_dir is None
    monkeypatch.setenv("TXENGINE_HISTORY_RETENTION_DAYS", "0")
    history = from_env().sweeper_config().history
    assert history is not None and history.retention_days is None
