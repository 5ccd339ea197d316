"""Partners: who may call the API, their credentials, their rate budget.

A partner signs every request (gateway/signing.py), with an HMAC secret or, RSA2, with a
private key whose public half is stored here. HMAC verification needs the secret itself,
so it cannot be stored hashed: it is stored encrypted with Fernet (AES-128-CBC plus
HMAC-SHA256, from `cryptography`) under a master key kept outside the database
(TXENGINE_SECRET_KEY, or a key file in the data directory, see `load_or_create_key`). A
copy of the database alone reveals no secret. Secrets are shown once, when created or
rotated, and never logged.

Rotation keeps the previous credential valid for an overlap period, so a partner can
deploy its new secret without a window where requests fail. Every administrative change
writes an audit entry in the same transaction.

The rate budget is a token bucket per partner in `partner_rate_buckets`; gateway
processes lease tokens from it in chunks (`lease_tokens`, one UPDATE per chunk), so the
limit holds across every process while the cost per request stays local.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import secrets
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

import asyncpg
from cryptography.fernet import Fernet, InvalidToken

from engine import audit

HMAC_SHA256: Final = "hmac-sha256"
RSA2: Final = "rsa2"
RATE_PER_S_DEFAULT: Final = 1_000
BURST_DEFAULT: Final = 2_000
RATE_PER_S_MAX: Final = 1_000_000
BURST_MAX: Final = 10_000_000
ROTATION_OVERLAP_S_DEFAULT: Final = 24 * 3600
ROTATION_OVERLAP_S_MAX: Final = 30 * 24 * 3600
# Credentials alive at once: the current one and those still in their overlap. Verifying
# tries each, so this bounds the work per request.
LIVE_CREDENTIALS_MAX: Final = 3
SECRET_KEY_FILE: Final = "secret.key"
LEASE_CHUNK_MAX: Final = 100_000
SECRET_LENGTH_MIN: Final = 32


class PartnerStatus(enum.StrEnum):
    ACTIVE = "active"  # may call the API
    DISABLED = "disabled"  # every request refused (401 partner_disabled); data kept


class PartnerError(Exception):
    """An operator's request that cannot be done: unknown partner, bad key, bad limit."""


@dataclasses.dataclass(frozen=True, slots=True)
class Partner:
    id: str
    name: str
    algorithm: str
    status: PartnerStatus
    rate_per_s: int
    burst: int
    created_at: datetime
    disabled_at: datetime | None
    live_credentials: int


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """What the gateway needs to authenticate one partner's requests."""

    partner_id: str
    algorithm: str
    status: PartnerStatus
    rate_per_s: int
    burst: int
    secrets: tuple[bytes, ...]  # HMAC secrets, current first
    public_keys_pem: tuple[str, ...]  # RSA2 public keys, current first


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    granted: int  # tokens this process may spend
    retry_after_s: float  # when nothing was granted: when one token will be there


# -- the master key -------------------------------------------------------------------------


class SecretBox:
    """Encrypts and decrypts partner secrets under the master key."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def open(self, sealed: bytes) -> bytes:
        try:
            return self._fernet.decrypt(sealed)
        except InvalidToken:
            raise PartnerError(
                "a partner secret does not decrypt: is TXENGINE_SECRET_KEY the key it was "
                "stored under?"
            ) from None


def new_master_key() -> bytes:
    return Fernet.generate_key()


def load_or_create_key(path: Path) -> bytes:
    """The master key in `path`, created (mode 0600) on first use. Several processes may
    race to create it: O_EXCL lets exactly one win, the others read its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(new_master_key())
            file.flush()
            os.fsync(file.fileno())
    key = path.read_bytes().strip()
    Fernet(key)  # refuse a damaged file now rather than on the first request
    return key


def new_secret() -> str:
    return "sk_" + secrets.token_urlsafe(32)


# -- operator actions -----------------------------------------------------------------------


def _check_limits(rate_per_s: int, burst: int) -> None:
    if not 1 <= rate_per_s <= RATE_PER_S_MAX:
        raise PartnerError(f"rate_per_s must be 1 to {RATE_PER_S_MAX}")
    if not 1 <= burst <= BURST_MAX:
        raise PartnerError(f"burst must be 1 to {BURST_MAX}")


async def create(
    conn: asyncpg.Connection,
    box: SecretBox,
    *,
    partner_id: str,
    name: str,
    actor: str,
    public_key_pem: str | None = None,
    rate_per_s: int = RATE_PER_S_DEFAULT,
    burst: int = BURST_DEFAULT,
    secret: str | None = None,
) -> str | None:
    """Create a partner; return its HMAC secret (shown once), or None for an RSA2 partner
    (`public_key_pem` given). `secret` imports one issued elsewhere (at least
    SECRET_LENGTH_MIN characters); by default a new random one is made. PartnerError if
    the id is taken or a value is invalid."""
    _check_limits(rate_per_s, burst)
    algorithm = RSA2 if public_key_pem is not None else HMAC_SHA256
    if public_key_pem is not None:
        secret = None
    elif secret is None:
        secret = new_secret()
    elif len(secret) < SECRET_LENGTH_MIN:
        raise PartnerError(f"a secret needs at least {SECRET_LENGTH_MIN} characters")
    async with conn.transaction():
        try:
            await conn.execute(
                """INSERT INTO partners (id, name, algorithm, status, rate_per_s, burst)
                   VALUES ($1, $2, $3, 'active', $4, $5)""",
                partner_id,
                name,
                algorithm,
                rate_per_s,
                burst,
            )
        except asyncpg.UniqueViolationError:
            raise PartnerError(f"partner {partner_id!r} exists") from None
        except asyncpg.CheckViolationError as error:
            raise PartnerError(f"invalid partner: {error.constraint_name}") from None
        await _insert_credential(conn, box, partner_id, 1, secret, public_key_pem)
        await conn.execute(
            """INSERT INTO partner_rate_buckets (partner_id, tokens, refilled_at)
               VALUES ($1, $2, clock_timestamp())""",
            partner_id,
            float(burst),
        )
        details = {"name": name, "algorithm": algorithm, "rate_per_s": rate_per_s, "burst": burst}
        await audit.append(
            conn, actor=actor, action="partner.created", subject=partner_id, details=details
        )
    return secret


async def _insert_credential(
    conn: asyncpg.Connection,
    box: SecretBox,
    partner_id: str,
    version: int,
    secret: str | None,
    public_key_pem: str | None,
) -> None:
    await conn.execute(
        """INSERT INTO partner_credentials (partner_id, version, secret_sealed, public_key_pem)
           VALUES ($1, $2, $3, $4)""",
        partner_id,
        version,
        None if secret is None else box.seal(secret),
        public_key_pem,
    )


async def rotate(
    conn: asyncpg.Connection,
    box: SecretBox,
    *,
    partner_id: str,
    actor: str,
    overlap_s: int = ROTATION_OVERLAP_S_DEFAULT,
    public_key_pem: str | None = None,
) -> str | None:
    """Give the partner a new credential; the current one stays valid `overlap_s` more
    seconds (0: revoked now). Return the new HMAC secret, or None for RSA2."""
    if not 0 <= overlap_s <= ROTATION_OVERLAP_S_MAX:
        raise PartnerError(f"overlap must be 0 to {ROTATION_OVERLAP_S_MAX} s")
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT algorithm FROM partners WHERE id = $1 FOR UPDATE", partner_id
        )
        if row is None:
            raise PartnerError(f"no partner {partner_id!r}")
        if (row["algorithm"] == RSA2) != (public_key_pem is not None):
            raise PartnerError(f"a {row['algorithm']} partner rotates with a new public key")
        # The current credential ends after the overlap; older ones keep their earlier end.
        # Beyond LIVE_CREDENTIALS_MAX, the oldest still live end now.
        await conn.execute(
            """UPDATE partner_credentials
               SET expires_at = clock_timestamp() + make_interval(secs => $2)
               WHERE partner_id = $1 AND expires_at IS NULL""",
            partner_id,
            float(overlap_s),
        )
        await conn.execute(
            """UPDATE partner_credentials SET expires_at = clock_timestamp()
               WHERE partner_id = $1 AND version IN (
                   SELECT version FROM partner_credentials
                   WHERE partner_id = $1 AND expires_at > clock_timestamp()
                   ORDER BY version DESC OFFSET $2)""",
            partner_id,
            LIVE_CREDENTIALS_MAX - 1,
        )
        version = await conn.fetchval(
            "SELECT max(version) + 1 FROM partner_credentials WHERE partner_id = $1", partner_id
        )
        secret = None if public_key_pem is not None else new_secret()
        await _insert_credential(conn, box, partner_id, version, secret, public_key_pem)
        await audit.append(
            conn,
            actor=actor,
            action="partner.rotated",
            subject=partner_id,
            details={"version": version, "overlap_s": overlap_s},
        )
    return secret


async def set_status(
    conn: asyncpg.Connection, *, partner_id: str, status: PartnerStatus, actor: str
) -> None:
    async with conn.transaction():
        done = await conn.fetchval(
            """UPDATE partners SET status = $2,
                   disabled_at = CASE WHEN $2 = 'disabled' THEN clock_timestamp() END
               WHERE id = $1 RETURNING id""",
            partner_id,
            status.value,
        )
        if done is None:
            raise PartnerError(f"no partner {partner_id!r}")
        action = "partner.disabled" if status is PartnerStatus.DISABLED else "partner.enabled"
        await audit.append(conn, actor=actor, action=action, subject=partner_id)


async def set_limits(
    conn: asyncpg.Connection, *, partner_id: str, rate_per_s: int, burst: int, actor: str
) -> None:
    _check_limits(rate_per_s, burst)
    async with conn.transaction():
        done = await conn.fetchval(
            "UPDATE partners SET rate_per_s = $2, burst = $3 WHERE id = $1 RETURNING id",
            partner_id,
            rate_per_s,
            burst,
        )
        if done is None:
            raise PartnerError(f"no partner {partner_id!r}")
        await conn.execute(
            "UPDATE partner_rate_buckets SET tokens = least(tokens, $2) WHERE partner_id = $1",
            partner_id,
            float(burst),
        )
        await audit.append(
            conn,
            actor=actor,
            action="partner.limits_changed",
            subject=partner_id,
            details={"rate_per_s": rate_per_s, "burst": burst},
        )


async def list_partners(conn: asyncpg.Connection) -> list[Partner]:
    rows = await conn.fetch(
        """SELECT p.*, (SELECT count(*) FROM partner_credentials c
                        WHERE c.partner_id = p.id
                          AND (c.expires_at IS NULL OR c.expires_at > clock_timestamp()))
                       AS live_credentials
           FROM partners p ORDER BY p.id"""
    )
    return [
        Partner(
            id=row["id"],
            name=row["name"],
            algorithm=row["algorithm"],
            status=PartnerStatus(row["status"]),
            rate_per_s=row["rate_per_s"],
            burst=row["burst"],
            created_at=row["created_at"],
            disabled_at=row["disabled_at"],
            live_credentials=row["live_credentials"],
        )
        for row in rows
    ]


# -- what the gateway reads on the request path ---------------------------------------------


async def credentials(
    conn: asyncpg.Connection, box: SecretBox, partner_id: str
) -> Credentials | None:
    """The partner's live credentials, current first; None if there is no such partner."""
    rows = await conn.fetch(
        """SELECT p.algorithm, p.status, p.rate_per_s, p.burst,
                  c.secret_sealed, c.public_key_pem
           FROM partners p
           LEFT JOIN partner_credentials c ON c.partner_id = p.id
                AND (c.expires_at IS NULL OR c.expires_at > clock_timestamp())
           WHERE p.id = $1 ORDER BY c.version DESC LIMIT $2""",
        partner_id,
        LIVE_CREDENTIALS_MAX,
    )
    if not rows:
        return None
    first = rows[0]
    sealed: Sequence[bytes] = [r["secret_sealed"] for r in rows if r["secret_sealed"]]
    return Credentials(
        partner_id=partner_id,
        algorithm=first["algorithm"],
        status=PartnerStatus(first["status"]),
        rate_per_s=first["rate_per_s"],
        burst=first["burst"],
        secrets=tuple(box.open(s) for s in sealed),
        public_keys_pem=tuple(r["public_key_pem"] for r in rows if r["public_key_pem"]),
    )


async def lease_tokens(conn: asyncpg.Connection, partner_id: str, *, want: int) -> Lease:
    """Take up to `want` whole tokens from the partner's shared bucket: one UPDATE, which
    refills the bucket for the time passed and serialises concurrent leases on the row."""
    assert 1 <= want <= LEASE_CHUNK_MAX, want
    row = await conn.fetchrow(
        """WITH bucket AS (
               SELECT b.partner_id, p.rate_per_s,
                      least(p.burst::float8, b.tokens + p.rate_per_s *
                            extract(epoch FROM clock_timestamp() - b.refilled_at)::float8)
                      AS available
               FROM partner_rate_buckets b JOIN partners p ON p.id = b.partner_id
               WHERE b.partner_id = $1 FOR UPDATE OF b)
           UPDATE partner_rate_buckets b
           SET tokens = bucket.available - least(floor(bucket.available), $2::int),
               refilled_at = clock_timestamp()
           FROM bucket WHERE b.partner_id = bucket.partner_id
           RETURNING least(floor(bucket.available), $2::int)::int AS granted,
                     bucket.available, bucket.rate_per_s""",
        partner_id,
        want,
    )
    if row is None:
        return Lease(granted=0, retry_after_s=1.0)
    granted: int = row["granted"]
    missing = 1.0 - row["available"]
    return Lease(granted=granted, retry_after_s=max(0.0, missing / row["rate_per_s"]))
