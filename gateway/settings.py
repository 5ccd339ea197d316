"""Settings, read once from the environment (every name starts with TXENGINE_)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Final

from engine import EngineConfig, LaneConfig
from engine.history import HistoryConfig
from engine.partners import SECRET_KEY_FILE, load_or_create_key
from engine.products.banks import CHANNEL_TYPES, BanksConfig, ChannelConfig
from engine.sweeper import SweeperConfig

ENV_PREFIX: Final = "TXENGINE_"
BANK_URL_DEFAULT: Final = "http://127.0.0.1:8091"  # `python -m banksim --port 8091`


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _int(name: str, default: int) -> int:
    return int(_env(name, str(default)))


def _bool(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    database_url: str | None  # None: run the embedded PostgreSQL in data_dir
    data_dir: Path
    host: str
    port: int
    workers: int  # gateway processes sharing the port (SO_REUSEPORT)
    lanes: int  # shard lanes per process
    batch_size_max: int
    batch_wait_ms: float
    queue_depth_max: int
    lock_timeout_ms: int
    statement_timeout_ms: int
    body_size_max_bytes: int
    idempotency_retention_s: int
    auto_migrate: bool
    access_log: bool
    log_level: str
    sweeper: bool
    webhooks: bool  # run a webhook dispatcher in this process
    shutdown_timeout_s: float
    # Bank channels: where each bank is, the secret shared with it (never logged: the
    # field is left out of repr), and how txengine is reached for callbacks.
    channels: dict[str, ChannelConfig] = dataclasses.field(repr=False)
    banks: BanksConfig
    secret_key: str | None  # Fernet key sealing partner secrets; None: the data dir's file
    header_timeout_s: float  # a request's headers must arrive within this (also idle time)
    body_timeout_s: float  # a /v1 request's body must arrive within this after its headers

    def master_key(self) -> bytes:
        """The key partner secrets are sealed with: TXENGINE_SECRET_KEY, or else a key file
        in the data directory, made on first use (fine for one host with the embedded
        database; every host of a shared database needs the same TXENGINE_SECRET_KEY)."""
        if self.secret_key:
            return self.secret_key.encode()
        return load_or_create_key(self.data_dir / SECRET_KEY_FILE)

    partition_span_days: int
    history_retention_days: int  # 0: keep all history online
    archive_dir: Path | None  # None: archived partitions stay in the `archive` schema

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            lanes=self.lanes,
            lane=LaneConfig(
                batch_size_max=self.batch_size_max,
                batch_wait_ms=self.batch_wait_ms,
                queue_depth_max=self.queue_depth_max,
                lock_timeout_ms=self.lock_timeout_ms,
                statement_timeout_ms=self.statement_timeout_ms,
            ),
            idempotency_retention_s=self.idempotency_retention_s,
        )

    def sweeper_config(self) -> SweeperConfig:
        return SweeperConfig(
            history=HistoryConfig(
                partition_span_days=self.partition_span_days,
                retention_days=self.history_retention_days or None,
                archive_dir=self.archive_dir,
            )
        )


def from_env() -> Settings:
    database_url = os.environ.get("TXENGINE_DATABASE_URL") or None
    return Settings(
        database_url=database_url,
        data_dir=Path(_env("DATA_DIR", ".txengine")).resolve(),
        host=_env("HOST", "127.0.0.1"),
        port=_int("PORT", 8080),
        workers=_int("WORKERS", 1),
        # More lanes mean more batches in flight that lock overlapping accounts and wait
        # for each other; two per process measured best (bench/RESULTS.md).
        lanes=_int("LANES", 2),
        batch_size_max=_int("BATCH_SIZE_MAX", 500),
        batch_wait_ms=float(_env("BATCH_WAIT_MS", "2")),
        queue_depth_max=_int("QUEUE_DEPTH_MAX", 10_000),
        lock_timeout_ms=_int("LOCK_TIMEOUT_MS", 2_000),
        statement_timeout_ms=_int("STATEMENT_TIMEOUT_MS", 5_000),
        body_size_max_bytes=_int("BODY_SIZE_MAX_BYTES", 64 * 1024),
        idempotency_retention_s=_int("IDEMPOTENCY_RETENTION_S", 24 * 3600),
        # The embedded database belongs to txengine, so it migrates itself; an external
        # one is migrated on purpose with `txengine migrate`.
        auto_migrate=_bool("AUTO_MIGRATE", database_url is None),
        # One JSON line per request costs about a third of the throughput at full load
        # (measured in bench/RESULTS.md), so it is opt-in; 5xx answers are always logged.
        access_log=_bool("ACCESS_LOG", False),
        log_level=_env("LOG_LEVEL", "INFO"),
        sweeper=_bool("SWEEPER", True),
        # Every process delivers (claims are SKIP LOCKED and leased, so they share the
        # work without sending an attempt twice); set 0 to keep a process out of it.
        webhooks=_bool("WEBHOOKS", True),
        shutdown_timeout_s=float(_env("SHUTDOWN_TIMEOUT_S", "30")),
        channels=_channels(),
        banks=BanksConfig(
            callback_base_url=_env(
                "CALLBACK_BASE_URL", f"http://{_env('HOST', '127.0.0.1')}:{_int('PORT', 8080)}"
            ),
            request_timeout_s=float(_env("BANK_REQUEST_TIMEOUT_S", "5")),
            send_attempts_max=_int("BANK_SEND_ATTEMPTS_MAX", 3),
        ),
        secret_key=os.environ.get("TXENGINE_SECRET_KEY") or None,
        # aiohttp has no header timeout of its own; its keep-alive timer, which runs from
        # the connection's start and from each answer, closes a connection whose next
        # request has not fully arrived by then, which bounds a slow sender's hold.
        header_timeout_s=float(_env("HEADER_TIMEOUT_S", "15")),
        body_timeout_s=float(_env("BODY_TIMEOUT_S", "10")),
        partition_span_days=_int("PARTITION_SPAN_DAYS", 7),
        history_retention_days=_int("HISTORY_RETENTION_DAYS", 90),
        archive_dir=Path(_env("ARCHIVE_DIR", "")).resolve() if _env("ARCHIVE_DIR", "") else None,
    )


def _channels() -> dict[str, ChannelConfig]:
    """Every channel, each at TXENGINE_CHANNEL_<NAME>_URL (default TXENGINE_BANK_URL)
    with secret TXENGINE_CHANNEL_<NAME>_SECRET. The embedded secrets are for development
    with the bank simulator only; a deployment sets its own."""
    bank_url = _env("BANK_URL", BANK_URL_DEFAULT)
    channels = {}
    for channel_type in CHANNEL_TYPES:
        prefix = f"CHANNEL_{channel_type.name.upper()}_"
        deadline = _env(prefix + "DEADLINE_S", "")
        channels[channel_type.name] = ChannelConfig(
            base_url=_env(prefix + "URL", bank_url),
            secret=_env(prefix + "SECRET", f"txengine-dev-secret-{channel_type.name}"),
            deadline_s=int(deadline) if deadline else None,
        )
    return channels
