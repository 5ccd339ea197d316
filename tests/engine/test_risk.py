"""Tests for engine.risk and the risk rules of engine.rules, without a database.

`RiskLedger` plays the store as far as risk needs: it locks (hands over) the accounts,
writes the changed accounts back, and keeps the challenges. The hypothesis test feeds it
random batches at random times and checks that no account ever sends more in a UTC day,
or makes more transfers in a minute, than its limits allow, counted from the accepted
transfers themselves, not from the counters.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import risk
from engine.model import (
    AccountKind,
    Command,
    ConfirmStepUp,
    CreateTransfers,
    PostPending,
    Result,
    ResultCode,
    StepUpStatus,
    TransferSpec,
    VoidPending,
)
from engine.risk import RiskCounters, RiskRules
from engine.rules import AccountState, ChallengeState, HoldState, apply_batch

T0 = datetime(2025, 3, 1, 23, 58, 30, tzinfo=UTC)  # 90 s before a UTC midnight
CNY = "CNY"


def test_merge_prefers_the_account_and_keeps_the_kind_default_elsewhere() -> None:
    kind = RiskRules(daily_outflow_max_minor=1000, velocity_max_per_minute=5)
    account = RiskRules(daily_outflow_max_minor=50, frozen=True)
    merged = risk.merge(kind, account)
    assert merged == RiskRules(daily_outflow_max_minor=50, velocity_max_per_minute=5, frozen=True)
    assert risk.merge(None, None) is None
    assert risk.merge(None, RiskRules()) is None
    assert risk.merge(kind, None) is kind
    assert risk.merge(RiskRules(), RiskRules()) is None


def test_counters_start_again_each_utc_day_and_minute_and_never_go_back() -> None:
    minute = risk.minute_of(T0)
    counters = RiskCounters(minute=minute, outflow_day_minor=700, transfers_minute=3)
    assert counters.at(minute) == counters
    next_minute = counters.at(minute + 1)  # 23:59, same day
    assert (next_minute.outflow_day_minor, next_minute.transfers_minute) == (700, 0)
    next_day = counters.at(minute + 2)  # 00:00 the next day
    assert (next_day.outflow_day_minor, next_day.transfers_minute) == (0, 0)
    # A clock behind the counter counts in the counter's minute, not in an earlier day.
    behind = counters.at(minute - 10_000)
    assert behind == counters
    after = counters.after(300, minute)
    assert (after.outflow_day_minor, after.transfers_minute) == (1000, 4)


def test_outflow_refusal_order_and_retry_hints() -> None:
    rules = RiskRules(
        max_per_transfer_minor=500, daily_outflow_max_minor=1000, velocity_max_per_minute=2
    )
    minute = risk.minute_of(T0)
    fresh = risk.ZERO_COUNTERS
    assert risk.outflow_refusal(1, rules, fresh, 500, T0) is None
    refusal = risk.outflow_refusal(1, rules, fresh, 501, T0)
    assert refusal is not None and refusal.code is ResultCode.RISK_TRANSFER_LIMIT
    assert refusal.retry_after_s is None  # waiting does not help
    spent = RiskCounters(minute=minute, outflow_day_minor=900, transfers_minute=0)
    refusal = risk.outflow_refusal(1, rules, spent, 101, T0)
    assert refusal is not None and refusal.code is ResultCode.RISK_DAILY_OUTFLOW_LIMIT
    assert refusal.retry_after_s == 90  # until 00:00 UTC
    assert risk.outflow_refusal(1, rules, spent, 100, T0) is None
    busy = RiskCounters(minute=minute, outflow_day_minor=0, transfers_minute=2)
    refusal = risk.outflow_refusal(1, rules, busy, 1, T0)
    assert refusal is not None and refusal.code is ResultCode.RISK_VELOCITY_LIMIT
    assert refusal.retry_after_s == 30  # until the next minute
    assert risk.outflow_refusal(1, rules, busy, 1, T0 + timedelta(seconds=30)) is None


def test_codes_match_only_their_own_challenge() -> None:
    salt = b"s" * 16
    digest = risk.hash_code(salt, 7, "123456")
    assert risk.code_matches(salt, digest, 7, "123456")
    assert not risk.code_matches(salt, digest, 7, "123457")
    assert not risk.code_matches(salt, digest, 8, "123456")
    assert not risk.code_matches(b"t" * 16, digest, 7, "123456")


# -- the rules with risk, through apply_batch ------------------------------------------------


@dataclasses.dataclass
class RiskLedger:
    accounts: dict[int, AccountState] = dataclasses.field(default_factory=dict)
    holds: dict[int, HoldState] = dataclasses.field(default_factory=dict)
    challenges: dict[int, ChallengeState] = dataclasses.field(default_factory=dict)
    ids: itertools.count[int] = dataclasses.field(default_factory=lambda: itertools.count(1000))
    refusals: list[tuple[int, ResultCode]] = dataclasses.field(default_factory=list)
    codes: dict[int, str] = dataclasses.field(default_factory=dict)

    def open(self, rules: RiskRules | None = None, *, balance: int = 10**9) -> int:
        account_id = next(self.ids)
        self.accounts[account_id] = AccountState(
            id=account_id,
            currency=CNY,
            kind=AccountKind.USER,
            overdraft_allowed=False,
            scope="s",
            credits_posted=balance,
            risk=rules,
        )
        return account_id

    def apply(self, commands: list[Command], now: datetime) -> list[Result]:
        plan = apply_batch(
            commands,
            self.accounts,
            self.holds,
            now=now,
            next_id=lambda: next(self.ids),
            challenges=self.challenges,
        )
        # Whatever the rules decide, the counters they hand back stay within the limits.
        for account in plan.accounts_changed.values():
            check_counters(account)
        self.accounts.update(plan.accounts_changed)
        for transfer, scope in plan.transfers_created:
            if transfer.pending:
                self.holds[transfer.id] = HoldState(
                    id=transfer.id,
                    debit_account_id=transfer.debit_account_id,
                    credit_account_id=transfer.credit_account_id,
                    currency=CNY,
                    amount_minor=transfer.amount_minor,
                    status=transfer.status,
                    pending=True,
                    scope=scope,
                    group_id=None,
                    metadata={},
                    expires_at=None,
                    created_at=now,
                )
        for update in plan.hold_updates:
            self.holds[update.id].status = update.status
        for new in plan.challenges_created:
            code, salt = f"{new.id % 1_000_000:06d}", b"salt"
            self.codes[new.id] = code
            self.challenges[new.id] = ChallengeState(
                id=new.id,
                scope=new.scope,
                account_id=new.account_id,
                command=new.command,
                salt=salt,
                code_hash=risk.hash_code(salt, new.id, code),
                attempts=0,
                status=StepUpStatus.PENDING,
                expires_at=new.expires_at,
            )
        for change in plan.challenge_updates:
            self.challenges[change.id].status = change.status
            self.challenges[change.id].attempts = change.attempts
        self.refusals += [(r.account_id, r.code) for r in plan.refusals]
        return plan.results


def check_counters(account: AccountState) -> None:
    rules, counters = account.risk, account.counters
    if rules is None or counters is None:
        return
    if rules.daily_outflow_max_minor is not None:
        assert counters.outflow_day_minor <= rules.daily_outflow_max_minor, account
    if rules.velocity_max_per_minute is not None:
        assert counters.transfers_minute <= rules.velocity_max_per_minute, account


def transfer(debit: int, credit: int, amount: int, *, pending: bool = False) -> TransferSpec:
    return TransferSpec(
        debit_account_id=debit,
        credit_account_id=credit,
        amount_minor=amount,
        currency=CNY,
        pending=pending,
    )


def one(debit: int, credit: int, amount: int, *, pending: bool = False) -> CreateTransfers:
    return CreateTransfers(transfers=(transfer(debit, credit, amount, pending=pending),))


def codes(results: list[Result]) -> list[ResultCode]:
    return [r.code for r in results]


def test_a_batch_without_rules_neither_counts_nor_records() -> None:
    ledger = RiskLedger()
    a, b = ledger.open(), ledger.open()
    assert codes(ledger.apply([one(a, b, 5), one(b, a, 3)], T0)) == [ResultCode.OK] * 2
    assert ledger.accounts[a].counters is None and ledger.refusals == []


def test_each_refusal_moves_nothing_and_is_recorded_with_its_account() -> None:
    ledger = RiskLedger()
    payer = ledger.open(
        RiskRules(
            max_per_transfer_minor=100, daily_outflow_max_minor=150, velocity_max_per_minute=3
        )
    )
    frozen = ledger.open(RiskRules(frozen=True))
    payee = ledger.open()
    results = ledger.apply(
        [
            one(payer, payee, 101),  # above the per-transfer maximum
            one(payer, payee, 100),
            one(payer, payee, 51),  # 151 > 150 today
            one(payer, frozen, 1),  # into a frozen account
            one(frozen, payee, 1),  # out of a frozen account
            one(payer, payee, 50),
            one(payer, payee, 0 + 1),  # the daily limit first, as it is checked first
        ],
        T0,
    )
    assert codes(results) == [
        ResultCode.RISK_TRANSFER_LIMIT,
        ResultCode.OK,
        ResultCode.RISK_DAILY_OUTFLOW_LIMIT,
        ResultCode.ACCOUNT_FROZEN,
        ResultCode.ACCOUNT_FROZEN,
        ResultCode.OK,
        ResultCode.RISK_DAILY_OUTFLOW_LIMIT,
    ]
    assert ledger.accounts[payer].debits_posted == 150
    assert ledger.refusals == [
        (payer, ResultCode.RISK_TRANSFER_LIMIT),
        (payer, ResultCode.RISK_DAILY_OUTFLOW_LIMIT),
        (frozen, ResultCode.ACCOUNT_FROZEN),
        (frozen, ResultCode.ACCOUNT_FROZEN),
        (payer, ResultCode.RISK_DAILY_OUTFLOW_LIMIT),
    ]
    # After 00:00 UTC the day starts again (T0 is 90 s before midnight).
    assert codes(ledger.apply([one(payer, payee, 100)], T0 + timedelta(seconds=90))) == [
        ResultCode.OK
    ]


def test_velocity_counts_accepted_transfers_of_the_minute() -> None:
    ledger = RiskLedger()
    payer, payee = ledger.open(RiskRules(velocity_max_per_minute=2)), ledger.open()
    batch: list[Command] = [one(payer, payee, 1) for _ in range(3)]
    assert codes(ledger.apply(batch, T0)) == [ResultCode.OK] * 2 + [ResultCode.RISK_VELOCITY_LIMIT]
    assert codes(ledger.apply(batch[:1], T0 + timedelta(seconds=29))) == [
        ResultCode.RISK_VELOCITY_LIMIT
    ]
    assert codes(ledger.apply(batch, T0 + timedelta(seconds=30))) == [ResultCode.OK] * 2 + [
        ResultCode.RISK_VELOCITY_LIMIT
    ]


def test_a_refused_group_counts_nothing() -> None:
    ledger = RiskLedger()
    payer, payee = ledger.open(RiskRules(daily_outflow_max_minor=100)), ledger.open()
    group = CreateTransfers(
        transfers=(transfer(payer, payee, 60), transfer(payer, payee, 60)), linked=True
    )
    (result,) = ledger.apply([group], T0)
    assert (result.code, result.failed_index) == (ResultCode.RISK_DAILY_OUTFLOW_LIMIT, 1)
    assert ledger.accounts[payer].counters is None  # nothing was counted
    assert codes(ledger.apply([one(payer, payee, 100)], T0)) == [ResultCode.OK]


def test_a_voided_hold_does_not_give_its_outflow_back() -> None:
    ledger = RiskLedger()
    payer, payee = ledger.open(RiskRules(daily_outflow_max_minor=100)), ledger.open()
    (hold,) = ledger.apply([one(payer, payee, 80, pending=True)], T0)
    assert hold.ok
    assert codes(ledger.apply([VoidPending(transfer_id=hold.transfers[0].id)], T0)) == [
        ResultCode.OK
    ]
    assert ledger.accounts[payer].debits_pending == 0
    assert codes(ledger.apply([one(payer, payee, 21)], T0)) == [ResultCode.RISK_DAILY_OUTFLOW_LIMIT]
    assert codes(ledger.apply([one(payer, payee, 20)], T0)) == [ResultCode.OK]


def test_posting_stops_at_a_frozen_account_but_voiding_does_not() -> None:
    ledger = RiskLedger()
    payer, payee = ledger.open(), ledger.open()
    results = ledger.apply([one(payer, payee, 10, pending=True) for _ in range(2)], T0)
    first, second = (r.transfers[0].id for r in results)
    ledger.accounts[payer].risk = RiskRules(frozen=True)
    assert codes(ledger.apply([PostPending(transfer_id=first)], T0)) == [ResultCode.ACCOUNT_FROZEN]
    assert codes(ledger.apply([VoidPending(transfer_id=second)], T0)) == [ResultCode.OK]
    assert ledger.refusals == [(payer, ResultCode.ACCOUNT_FROZEN)]


def test_step_up_keeps_the_command_until_the_right_code() -> None:
    ledger = RiskLedger()
    payer, payee = ledger.open(RiskRules(step_up_threshold_minor=100)), ledger.open()
    assert codes(ledger.apply([one(payer, payee, 100)], T0)) == [ResultCode.OK]
    (held,) = ledger.apply([one(payer, payee, 101)], T0)
    assert held.code is ResultCode.STEP_UP_REQUIRED and held.step_up is not None
    assert ledger.accounts[payer].debits_posted == 100  # nothing moved
    challenge = held.step_up.id
    code = ledger.codes[challenge]
    wrong = "000000" if code != "000000" else "111111"
    (refused,) = ledger.apply([ConfirmStepUp(challenge_id=challenge, code=wrong)], T0)
    assert (refused.code, refused.attempts_left) == (ResultCode.STEP_UP_CODE_INVALID, 4)
    confirmed, again = ledger.apply(
        [ConfirmStepUp(challenge_id=challenge, code=code)] * 2, T0 + timedelta(seconds=10)
    )
    assert confirmed.ok and confirmed.transfers[0].amount_minor == 101
    assert again.code is ResultCode.STEP_UP_ALREADY_CONFIRMED
    assert ledger.accounts[payer].debits_posted == 201  # moved once


def test_step_up_dies_after_too_many_wrong_codes_or_when_expired() -> None:
    ledger = RiskLedger()
    payer, payee = ledger.open(RiskRules(step_up_threshold_minor=0)), ledger.open()
    first, second = (r.step_up for r in ledger.apply([one(payer, payee, 5)] * 2, T0))
    assert first is not None and second is not None
    wrong = [ConfirmStepUp(challenge_id=first.id, code="999999")] * risk.STEP_UP_ATTEMPTS_MAX
    if ledger.codes[first.id] == "999999":
        wrong = [ConfirmStepUp(challenge_id=first.id, code="888888")] * len(wrong)
    results = ledger.apply(list(wrong), T0)
    assert [r.attempts_left for r in results] == [4, 3, 2, 1, 0]
    right = ConfirmStepUp(challenge_id=first.id, code=ledger.codes[first.id])
    assert codes(ledger.apply([right], T0)) == [ResultCode.STEP_UP_ATTEMPTS_EXCEEDED]
    late = T0 + timedelta(seconds=risk.STEP_UP_TTL_S)
    right = ConfirmStepUp(challenge_id=second.id, code=ledger.codes[second.id])
    assert codes(ledger.apply([right], late)) == [ResultCode.STEP_UP_EXPIRED]
    assert ledger.accounts[payer].debits_posted == 0
    assert Counter(code for _, code in ledger.refusals) == {
        ResultCode.STEP_UP_CODE_INVALID: 5,
        ResultCode.STEP_UP_ATTEMPTS_EXCEEDED: 1,
        ResultCode.STEP_UP_EXPIRED: 1,
    }


def test_no_code_is_sent_for_a_transfer_that_would_fail_anyway() -> None:
    ledger = RiskLedger()
    payer = ledger.open(RiskRules(step_up_threshold_minor=10), balance=50)
    payee = ledger.open()
    assert codes(ledger.apply([one(payer, payee, 60)], T0)) == [ResultCode.INSUFFICIENT_FUNDS]
    assert ledger.challenges == {}


# -- hypothesis: limits hold whatever arrives, whenever ------------------------------------

_limits = st.one_of(st.none(), st.integers(min_value=0, max_value=300))
_rules = st.builds(
    RiskRules,
    max_per_transfer_minor=st.one_of(st.none(), st.integers(min_value=1, max_value=200)),
    daily_outflow_max_minor=_limits,
    velocity_max_per_minute=st.one_of(st.none(), st.integers(min_value=0, max_value=4)),
)
_transfer = st.tuples(
    st.integers(min_value=0, max_value=3),  # payer
    st.integers(min_value=0, max_value=3),  # payee
    st.integers(min_value=1, max_value=150),
    st.booleans(),  # pending
)
_batch = st.tuples(
    st.integers(min_value=0, max_value=3_000),  # seconds since the last batch
    st.lists(st.lists(_transfer, min_size=1, max_size=3), min_size=1, max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.lists(st.one_of(st.none(), _rules), min_size=4, max_size=4),
    batches=st.lists(_batch, min_size=1, max_size=12),
)
def test_accepted_transfers_never_exceed_any_limit(
    rules: list[RiskRules | None], batches: list[tuple[int, list[list[tuple[int, int, int, bool]]]]]
) -> None:
    ledger = RiskLedger()
    ids = [ledger.open(r) for r in rules]
    outflow: dict[tuple[int, int], int] = defaultdict(int)  # (account, UTC day) -> sent
    velocity: dict[tuple[int, int], int] = defaultdict(int)  # (account, minute) -> transfers
    now = T0
    for gap_s, commands in batches:
        now += timedelta(seconds=gap_s)
        batch: list[Command] = [
            CreateTransfers(
                transfers=tuple(
                    transfer(ids[d], ids[c], amount, pending=p) for d, c, amount, p in specs
                ),
                linked=len(specs) > 1,
            )
            for specs in commands
        ]
        valid = [
            c for c in batch if all(s.debit_account_id != s.credit_account_id for s in c.transfers)
        ]
        for command, result in zip(valid, ledger.apply(valid, now), strict=True):
            if not result.ok:
                continue
            for spec in command.transfers:
                minute = risk.minute_of(now)
                outflow[(spec.debit_account_id, minute // risk.MINUTES_PER_DAY)] += (
                    spec.amount_minor
                )
                velocity[(spec.debit_account_id, minute)] += 1
                limit = ledger.accounts[spec.debit_account_id].risk
                if limit is None:
                    continue
                if limit.max_per_transfer_minor is not None:
                    assert spec.amount_minor <= limit.max_per_transfer_minor
                if limit.frozen:
                    pytest.fail("a frozen account sent money")
    for (account_id, _), sent in outflow.items():
        limit = ledger.accounts[account_id].risk
        if limit is not None and limit.daily_outflow_max_minor is not None:
            assert sent <= limit.daily_outflow_max_minor
    for (account_id, _), count in velocity.items():
        limit = ledger.accounts[account_id].risk
        if limit is not None and limit.velocity_max_per_minute is not None:
            assert count <= limit.velocity_max_per_minute
