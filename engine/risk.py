"""Risk rules: limits per transfer, per UTC day and per minute, frozen accounts, step-up.

Pure functions and plain data, used by engine.rules while a batch is decided, so they
are tested directly and by hypothesis. Nothing here does I/O; the only randomness
(a step-up code and its salt) is drawn by the store and handed in.

Where the rules live and why:

* Defaults per account kind (table risk_kind_rules) and overrides per account (columns
  risk_* of accounts; NULL inherits the kind's value). An override replaces the default;
  to exempt one account from a kind's limit, give it INT64_MAX. Frozen is per account only:
  freezing is an action on one account, not a policy.
* Counters live on the account row itself and are read by the statement that locks it
  (FOR UPDATE) and written by the statement that writes its balance, in the same
  transaction. PostgreSQL re-reads a row locked after waiting (EvalPlanQual), so a batch
  always sees the counters the previous holder of the lock committed: exact under any
  number of lanes and processes, with no extra round trip. A counter in another table,
  read in the same statement, would be read from the statement's older snapshot.
* Counters are kept only while an account has a daily or velocity limit (kind default or
  its own), so accounts without such rules cost nothing. Counting starts when a limit
  first applies: outflow made earlier that day is not counted.

What counts:

* Outflow: the amount of every accepted transfer debiting the account, immediate or hold,
  when it is made. A hold later voided, expired or posted in part does NOT give outflow
  back: the limit bounds what the payer committed to pay in a day, the counter only ever
  grows within a day, and no resolution of an old hold can reopen an earlier day.
* Velocity: accepted transfers debiting the account (each transfer of a linked group
  counts) within the current calendar minute. Refused attempts do not count.
* Days are calendar days in UTC and minutes are calendar minutes in UTC (fixed windows).
  A counter never goes back in time: with clocks of different processes slightly apart,
  a batch whose clock is behind the counter's minute counts in the counter's minute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from datetime import datetime
from typing import Final

from engine.model import ResultCode

STEP_UP_TTL_S: Final = 300  # a challenge expires 5 minutes after it was made
STEP_UP_ATTEMPTS_MAX: Final = 5  # wrong codes before a challenge is dead
MINUTES_PER_DAY: Final = 24 * 60
SECONDS_PER_MINUTE: Final = 60


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RiskRules:
    """The rules in force for one account (or one kind's defaults). None: no limit."""

    max_per_transfer_minor: int | None = None
    daily_outflow_max_minor: int | None = None
    velocity_max_per_minute: int | None = None
    step_up_threshold_minor: int | None = None  # transfers above it need the payer's code
    frozen: bool = False  # no money moves into or out of the account

    @property
    def counted(self) -> bool:
        """Whether the account's counters must be kept."""
        return self.daily_outflow_max_minor is not None or self.velocity_max_per_minute is not None

    @property
    def empty(self) -> bool:
        return self == _NO_RULES


_NO_RULES: Final = RiskRules()


def merge(kind: RiskRules | None, account: RiskRules | None) -> RiskRules | None:
    """The account's rules: its own overrides where set, else its kind's defaults."""
    if account is None:
        return kind
    if kind is None:
        return None if account.empty else account
    merged = RiskRules(
        max_per_transfer_minor=_first(account.max_per_transfer_minor, kind.max_per_transfer_minor),
        daily_outflow_max_minor=_first(
            account.daily_outflow_max_minor, kind.daily_outflow_max_minor
        ),
        velocity_max_per_minute=_first(
            account.velocity_max_per_minute, kind.velocity_max_per_minute
        ),
        step_up_threshold_minor=_first(
            account.step_up_threshold_minor, kind.step_up_threshold_minor
        ),
        frozen=account.frozen,
    )
    return None if merged.empty else merged


def _first(override: int | None, default: int | None) -> int | None:
    return default if override is None else override


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RiskCounters:
    """What an account has sent: `outflow_day_minor` within the UTC day of `minute`,
    `transfers_minute` within `minute` (whole minutes since the Unix epoch, UTC)."""

    minute: int
    outflow_day_minor: int
    transfers_minute: int

    def at(self, now_minute: int) -> RiskCounters:
        """The counters as of `now_minute`: a new day or minute starts from zero."""
        minute = max(now_minute, self.minute)  # never back in time
        same_day = minute // MINUTES_PER_DAY == self.minute // MINUTES_PER_DAY
        return RiskCounters(
            minute=minute,
            outflow_day_minor=self.outflow_day_minor if same_day else 0,
            transfers_minute=self.transfers_minute if minute == self.minute else 0,
        )

    def after(self, amount: int, now_minute: int) -> RiskCounters:
        """The counters once a transfer of `amount` has been accepted."""
        current = self.at(now_minute)
        return RiskCounters(
            minute=current.minute,
            outflow_day_minor=current.outflow_day_minor + amount,
            transfers_minute=current.transfers_minute + 1,
        )


ZERO_COUNTERS: Final = RiskCounters(minute=0, outflow_day_minor=0, transfers_minute=0)


def minute_of(now: datetime) -> int:
    """Whole minutes since the Unix epoch, UTC."""
    return int(now.timestamp()) // SECONDS_PER_MINUTE


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    code: ResultCode
    reason: str
    retry_after_s: int | None = None


def frozen_refusal(account_id: int, rules: RiskRules | None) -> Refusal | None:
    if rules is not None and rules.frozen:
        return Refusal(ResultCode.ACCOUNT_FROZEN, f"account {account_id} is frozen")
    return None


def outflow_refusal(
    account_id: int,
    rules: RiskRules,
    counters: RiskCounters,
    amount: int,
    now: datetime,
) -> Refusal | None:
    """Why the payer's rules refuse sending `amount` now, or None.

    Checked in a fixed order, so the same state always gives the same reason: the
    per-transfer maximum (no retry helps), then the daily outflow, then velocity.
    """
    limit = rules.max_per_transfer_minor
    if limit is not None and amount > limit:
        return Refusal(
            ResultCode.RISK_TRANSFER_LIMIT,
            f"account {account_id} may send at most {limit} per transfer, {amount} asked",
        )
    now_minute = minute_of(now)
    current = counters.at(now_minute)
    seconds_into_minute = int(now.timestamp()) % SECONDS_PER_MINUTE
    limit = rules.daily_outflow_max_minor
    if limit is not None and current.outflow_day_minor + amount > limit:
        into_day_s = (current.minute % MINUTES_PER_DAY) * SECONDS_PER_MINUTE + seconds_into_minute
        return Refusal(
            ResultCode.RISK_DAILY_OUTFLOW_LIMIT,
            f"account {account_id} has sent {current.outflow_day_minor} of its "
            f"{limit} daily outflow limit (UTC day), {amount} more asked",
            retry_after_s=max(1, MINUTES_PER_DAY * SECONDS_PER_MINUTE - into_day_s),
        )
    limit = rules.velocity_max_per_minute
    if limit is not None and current.transfers_minute + 1 > limit:
        return Refusal(
            ResultCode.RISK_VELOCITY_LIMIT,
            f"account {account_id} made {current.transfers_minute} transfers this minute, "
            f"the limit is {limit}",
            retry_after_s=max(1, SECONDS_PER_MINUTE - seconds_into_minute),
        )
    return None


def needs_step_up(rules: RiskRules | None, amount: int) -> bool:
    threshold = None if rules is None else rules.step_up_threshold_minor
    return threshold is not None and amount > threshold


# -- step-up codes -------------------------------------------------------------------------
# A code has only 10^6 values, so a hash alone would not keep a stolen table's codes
# secret from a determined reader; the salt stops precomputed tables, and what actually
# protects a challenge is that it dies after STEP_UP_ATTEMPTS_MAX wrong codes and
# STEP_UP_TTL_S seconds. Codes are compared in constant time.


def hash_code(salt: bytes, challenge_id: int, code: str) -> bytes:
    return hashlib.sha256(salt + challenge_id.to_bytes(8, "big") + code.encode()).digest()


def code_matches(salt: bytes, code_hash: bytes, challenge_id: int, code: str) -> bool:
    return hmac.compare_digest(hash_code(salt, challenge_id, code), code_hash)
