"""Pure application of a batch of commands to locked balances.

Given the locked accounts and holds a batch touches, `apply_batch` decides each command's
result in arrival order and returns what the store must write. Nothing here does I/O,
so the rules are tested directly, and by hypothesis, without a database.

Every movement debits one account and credits another by the same amount, so the
credit-normal balances of a currency keep summing to zero; `check_account` states the
per-account invariants and runs after every change.

Risk rules (engine.risk) are checked on accounts that carry any (`AccountState.risk`);
a batch whose accounts carry none skips them entirely, so they cost nothing there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from engine import risk
from engine.model import (
    INT64_MAX,
    PRODUCT_METADATA_KEY,
    AccountKind,
    AccountView,
    Command,
    ConfirmStepUp,
    CreateAccount,
    CreateTransfers,
    EntryKind,
    Metadata,
    PostPending,
    Result,
    ResultCode,
    StepUpStatus,
    StepUpView,
    TransferSpec,
    TransferStatus,
    TransferView,
    VoidPending,
)
from engine.risk import RiskCounters, RiskRules

IdSource = Callable[[], int]


@dataclasses.dataclass(slots=True, kw_only=True)
class AccountState:
    """A locked account's totals, changed in memory while a batch is applied."""

    id: int
    currency: str
    kind: AccountKind
    overdraft_allowed: bool
    scope: str
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    risk: RiskRules | None = None  # the rules in force (kind defaults merged), if any
    counters: RiskCounters | None = None  # kept while risk.counted; immutable, so shared

    def clone(self) -> AccountState:
        # dataclasses.replace costs several times more, and a batch clones every account.
        return AccountState(
            id=self.id,
            currency=self.currency,
            kind=self.kind,
            overdraft_allowed=self.overdraft_allowed,
            scope=self.scope,
            debits_posted=self.debits_posted,
            credits_posted=self.credits_posted,
            debits_pending=self.debits_pending,
            credits_pending=self.credits_pending,
            risk=self.risk,
            counters=self.counters,
        )

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def pending(self) -> int:
        return self.credits_pending - self.debits_pending


@dataclasses.dataclass(slots=True, kw_only=True)
class HoldState:
    """A locked pending transfer, as far as resolving it needs."""

    id: int
    debit_account_id: int
    credit_account_id: int
    currency: str
    amount_minor: int
    status: TransferStatus
    pending: bool  # False for an immediate transfer, which can never be posted or voided
    scope: str
    group_id: int | None
    metadata: Metadata
    expires_at: datetime | None
    created_at: datetime


@dataclasses.dataclass(slots=True, kw_only=True)
class ChallengeState:
    """A locked step-up challenge: the transfer command waiting for the payer's code."""

    id: int
    scope: str
    account_id: int  # the payer, who got the code
    command: CreateTransfers
    salt: bytes
    code_hash: bytes
    attempts: int  # wrong codes so far
    status: StepUpStatus
    expires_at: datetime


@dataclasses.dataclass(slots=True, kw_only=True, frozen=True)
class NewChallenge:
    """A challenge to create; the store draws its code, stores the hash, sends the code."""

    id: int
    scope: str
    account_id: int
    command: CreateTransfers
    expires_at: datetime


@dataclasses.dataclass(slots=True, kw_only=True, frozen=True)
class ChallengeUpdate:
    id: int
    status: StepUpStatus
    attempts: int
    result_code: ResultCode | None  # the transfer's result, once confirmed


@dataclasses.dataclass(slots=True, kw_only=True, frozen=True)
class RefusalRow:
    """A risk refusal to record, with the position of its command in the batch."""

    id: int
    command_index: int
    account_id: int
    code: ResultCode
    reason: str
    amount_minor: int | None


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which
# doubles the cost of the two entries every transfer writes.
@dataclasses.dataclass(slots=True, kw_only=True)
class EntryRow:
    account_id: int
    id: int
    transfer_id: int
    kind: EntryKind
    posted_delta_minor: int
    pending_delta_minor: int
    posted_after_minor: int
    pending_after_minor: int


@dataclasses.dataclass(slots=True, kw_only=True, frozen=True)
class HoldUpdate:
    id: int
    status: TransferStatus
    posted_amount_minor: int


@dataclasses.dataclass(slots=True, kw_only=True)
class BatchPlan:
    """What one batch decided: a result per command, and the rows to write."""

    results: list[Result]
    accounts_created: list[tuple[AccountState, Metadata]]
    # With the scope each belongs to: its debit account's, so that a transfer the operator
    # makes on someone's accounts stays visible to that someone.
    transfers_created: list[tuple[TransferView, str]]
    hold_updates: list[HoldUpdate]
    entries: list[EntryRow]
    # Accounts whose totals changed; each is written once however many transfers hit it.
    accounts_changed: dict[int, AccountState]
    challenges_created: list[NewChallenge] = dataclasses.field(default_factory=list)
    challenge_updates: list[ChallengeUpdate] = dataclasses.field(default_factory=list)
    refusals: list[RefusalRow] = dataclasses.field(default_factory=list)
    risky: bool = False  # some account carried risk rules: counters may have changed


def check_account(account: AccountState) -> None:
    """The invariants every account keeps after every change. A failure is a bug."""
    for total in (
        account.debits_posted,
        account.credits_posted,
        account.debits_pending,
        account.credits_pending,
    ):
        assert 0 <= total <= INT64_MAX, account
    assert account.debits_posted + account.debits_pending <= INT64_MAX, account
    assert account.credits_posted + account.credits_pending <= INT64_MAX, account
    if not account.overdraft_allowed:
        assert account.debits_posted + account.debits_pending <= account.credits_posted, account


def apply_batch(
    commands: Sequence[Command],
    accounts: Mapping[int, AccountState],
    holds: Mapping[int, HoldState],
    *,
    now: datetime,
    next_id: IdSource,
    challenges: Mapping[int, ChallengeState] | None = None,
) -> BatchPlan:
    """Apply `commands` in order to copies of `accounts`, `holds` and `challenges`.

    `accounts` must hold every existing account the commands name (absent ones do not
    exist or are not visible), `holds` every hold and `challenges` every step-up challenge
    they name, and the accounts of those. The inputs are not changed.
    """
    state = _BatchState(
        accounts={i: a.clone() for i, a in accounts.items()},
        holds={i: dataclasses.replace(h) for i, h in holds.items()},
        challenges={i: dataclasses.replace(c) for i, c in (challenges or {}).items()},
        now=now,
        next_id=next_id,
        risky=any(a.risk is not None for a in accounts.values()),
    )
    results = []
    for index, command in enumerate(commands):
        state.index = index
        results.append(state.apply(command))
    plan = BatchPlan(
        results=results,
        accounts_created=state.accounts_created,
        transfers_created=state.transfers_created,
        hold_updates=list(state.hold_updates.values()),
        entries=state.entries,
        accounts_changed={i: state.accounts[i] for i in sorted(state.changed_ids)},
        challenges_created=state.challenges_created,
        challenge_updates=list(state.challenge_updates.values()),
        refusals=state.refusals,
        risky=state.risky,
    )
    for account in plan.accounts_changed.values():
        check_account(account)
    return plan


def account_view(account: AccountState, *, metadata: Metadata, created_at: datetime) -> AccountView:
    return AccountView(
        id=account.id,
        currency=account.currency,
        kind=account.kind,
        overdraft_allowed=account.overdraft_allowed,
        debits_posted_minor=account.debits_posted,
        credits_posted_minor=account.credits_posted,
        debits_pending_minor=account.debits_pending,
        credits_pending_minor=account.credits_pending,
        metadata=metadata,
        created_at=created_at,
    )


def _failure(code: ResultCode, detail: str, *, index: int | None = None) -> Result:
    return Result(code=code, detail=detail, failed_index=index)


@dataclasses.dataclass(slots=True, kw_only=True)
class _Staged:
    """Changes of one command, kept aside until the whole command succeeds.

    A command that cannot fail after its checks have passed (one transfer, one hold
    resolution) is staged `direct`ly on the batch's accounts, saving a copy of each.
    """

    direct: bool = False
    accounts: dict[int, AccountState] = dataclasses.field(default_factory=dict)
    entries: list[EntryRow] = dataclasses.field(default_factory=list)
    transfers: list[tuple[TransferView, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True, kw_only=True)
class _BatchState:
    accounts: dict[int, AccountState]
    holds: dict[int, HoldState]
    challenges: dict[int, ChallengeState]
    now: datetime
    next_id: IdSource
    risky: bool  # some account of the batch carries risk rules
    index: int = 0  # position of the command being applied
    challenges_created: list[NewChallenge] = dataclasses.field(default_factory=list)
    challenge_updates: dict[int, ChallengeUpdate] = dataclasses.field(default_factory=dict)
    refusals: list[RefusalRow] = dataclasses.field(default_factory=list)
    changed_ids: set[int] = dataclasses.field(default_factory=set)
    accounts_created: list[tuple[AccountState, Metadata]] = dataclasses.field(default_factory=list)
    transfers_created: list[tuple[TransferView, str]] = dataclasses.field(default_factory=list)
    hold_updates: dict[int, HoldUpdate] = dataclasses.field(default_factory=dict)
    entries: list[EntryRow] = dataclasses.field(default_factory=list)

    def apply(self, command: Command) -> Result:
        if isinstance(command, CreateTransfers):
            return self._create_transfers(command)
        if isinstance(command, PostPending):
            return self._resolve(
                command.transfer_id, command.scope, post_amount=command.amount_minor
            )
        if isinstance(command, VoidPending):
            kind = EntryKind.EXPIRE if command.expired else EntryKind.VOID
            return self._resolve(command.transfer_id, command.scope, void_kind=kind)
        if isinstance(command, ConfirmStepUp):
            return self._confirm_step_up(command)
        return self._create_account(command)

    # -- accounts -------------------------------------------------------------------------

    def _create_account(self, command: CreateAccount) -> Result:
        account = AccountState(
            id=self.next_id(),
            currency=command.currency,
            kind=command.kind,
            overdraft_allowed=command.kind is AccountKind.SYSTEM,
            scope=command.scope or "",
        )
        # Not added to self.accounts: like a transfer made in this batch, an account made
        # in this batch cannot be named by a later command of it. The store writes new rows
        # and balance updates in one statement, whose UPDATE cannot see rows it inserts, so
        # a balance change to a new account would be lost.
        self.accounts_created.append((account, command.metadata))
        view = account_view(account, metadata=command.metadata, created_at=self.now)
        return Result(code=ResultCode.OK, account=view)

    def _visible(self, account_id: int, scope: str | None) -> AccountState | None:
        account = self.accounts.get(account_id)
        if account is None or (scope is not None and account.scope != scope):
            return None
        return account

    # -- transfers ------------------------------------------------------------------------

    def _create_transfers(self, command: CreateTransfers, *, confirmed: bool = False) -> Result:
        """Apply a transfer command, or, if a payer's step-up threshold is passed and the
        payer has not confirmed, keep it in a new challenge after checking that it would
        succeed now (no code is sent for a transfer that would fail anyway)."""
        assert command.transfers, "a CreateTransfers command names at least one transfer"
        payer = None if confirmed or not self.risky else self._step_up_payer(command)
        staged = _Staged(direct=len(command.transfers) == 1 and payer is None)
        group_id = self.next_id() if command.linked else None
        for index, spec in enumerate(command.transfers):
            failure = self._stage_transfer(staged, spec, command.scope, group_id)
            if failure is not None:
                if isinstance(failure, risk.Refusal):
                    code, detail, retry_after_s = (
                        failure.code,
                        failure.reason,
                        failure.retry_after_s,
                    )
                else:
                    (code, detail), retry_after_s = failure, None
                if command.linked and len(command.transfers) > 1:
                    detail = f"transfer {index} of the linked group failed: {detail}"
                return Result(
                    code=code, detail=detail, failed_index=index, retry_after_s=retry_after_s
                )
        if payer is not None:
            return self._challenge(command, payer)
        self._commit(staged)
        self.transfers_created.extend(staged.transfers)
        return Result(code=ResultCode.OK, transfers=tuple(t for t, _ in staged.transfers))

    def _stage_transfer(
        self, staged: _Staged, spec: TransferSpec, scope: str | None, group_id: int | None
    ) -> tuple[ResultCode, str] | risk.Refusal | None:
        debit = self._staged_account(staged, spec.debit_account_id, scope)
        credit = self._staged_account(staged, spec.credit_account_id, scope)
        failure = _transfer_failure(spec, debit, credit)
        if failure is not None:
            return failure
        assert debit is not None and credit is not None
        amount = spec.amount_minor
        if debit.risk is not None or credit.risk is not None:
            refusal = self._outflow_refusal(debit, credit, amount)
            if refusal is not None:
                return refusal
        if spec.pending:
            debit.debits_pending += amount
            credit.credits_pending += amount
        else:
            debit.debits_posted += amount
            credit.credits_posted += amount
        transfer = TransferView(
            id=self.next_id(),
            debit_account_id=debit.id,
            credit_account_id=credit.id,
            currency=spec.currency,
            amount_minor=amount,
            posted_amount_minor=0 if spec.pending else amount,
            status=TransferStatus.PENDING if spec.pending else TransferStatus.POSTED,
            pending=spec.pending,
            group_id=group_id,
            metadata=spec.metadata,
            expires_at=_expiry(self.now, spec.timeout_s) if spec.pending else None,
            created_at=self.now,
            resolved_at=None,
        )
        staged.transfers.append((transfer, debit.scope))
        kind = EntryKind.HOLD if spec.pending else EntryKind.TRANSFER
        posted_delta, pending_delta = (0, amount) if spec.pending else (amount, 0)
        self._stage_entry(staged, debit, transfer.id, kind, -posted_delta, -pending_delta)
        self._stage_entry(staged, credit, transfer.id, kind, posted_delta, pending_delta)
        return None

    def _outflow_refusal(
        self, debit: AccountState, credit: AccountState, amount: int
    ) -> risk.Refusal | None:
        """The risk rules' verdict on `debit` sending `amount` to `credit`; on acceptance
        the payer's counters move on (on the staged copy, so a failed group counts nothing)."""
        for account in (debit, credit):
            refusal = risk.frozen_refusal(account.id, account.risk)
            if refusal is not None:
                self._record(refusal, account.id, amount)
                return refusal
        rules = debit.risk
        if rules is None:
            return None
        counters = debit.counters or risk.ZERO_COUNTERS
        refusal = risk.outflow_refusal(debit.id, rules, counters, amount, self.now)
        if refusal is not None:
            self._record(refusal, debit.id, amount)
        elif rules.counted:
            debit.counters = counters.after(amount, risk.minute_of(self.now))
        return refusal

    def _record(self, refusal: risk.Refusal, account_id: int, amount: int | None) -> None:
        self.refusals.append(
            RefusalRow(
                id=self.next_id(),
                command_index=self.index,
                account_id=account_id,
                code=refusal.code,
                reason=refusal.reason,
                amount_minor=amount,
            )
        )

    def _staged_account(
        self, staged: _Staged, account_id: int, scope: str | None
    ) -> AccountState | None:
        account = staged.accounts.get(account_id)
        if account is not None:
            return account
        found = self._visible(account_id, scope)
        if found is None:
            return None
        account = found if staged.direct else found.clone()
        staged.accounts[account_id] = account
        return account

    def _stage_entry(
        self,
        staged: _Staged,
        account: AccountState,
        transfer_id: int,
        kind: EntryKind,
        posted_delta: int,
        pending_delta: int,
    ) -> None:
        staged.entries.append(
            EntryRow(
                account_id=account.id,
                id=self.next_id(),
                transfer_id=transfer_id,
                kind=kind,
                posted_delta_minor=posted_delta,
                pending_delta_minor=pending_delta,
                posted_after_minor=account.posted,
                pending_after_minor=account.pending,
            )
        )

    def _commit(self, staged: _Staged) -> None:
        # Invariants are checked once per batch, on every changed account, in apply_batch.
        for account in staged.accounts.values():
            self.accounts[account.id] = account
            self.changed_ids.add(account.id)
        self.entries.extend(staged.entries)

    # -- holds ----------------------------------------------------------------------------

    def _resolve(
        self,
        transfer_id: int,
        scope: str | None,
        *,
        post_amount: int | None = None,
        void_kind: EntryKind | None = None,
    ) -> Result:
        hold = self.holds.get(transfer_id)
        if hold is None or (scope is not None and hold.scope != scope):
            return _failure(ResultCode.TRANSFER_NOT_FOUND, f"no transfer {transfer_id}")
        if scope is not None and PRODUCT_METADATA_KEY in hold.metadata:
            product = hold.metadata[PRODUCT_METADATA_KEY]
            return _failure(
                ResultCode.TRANSFER_HELD_BY_PRODUCT,
                f"transfer {transfer_id} is held by a {product}; act on the {product} instead",
            )
        failure = _resolution_failure(hold, self.now, post_amount, void_kind)
        if failure is not None:
            return _failure(*failure)
        if void_kind is None and self.risky:
            # Posting moves money, so it stops at a frozen account; voiding and expiring
            # only give reserved money back, and are always allowed.
            refusal = self._frozen_refusal(hold)
            if refusal is not None:
                return _failure(refusal.code, refusal.reason)
        posted = hold.amount_minor if post_amount is None else post_amount
        if void_kind is not None:
            posted = 0
        staged = _Staged(direct=True)
        debit = self._staged_account(staged, hold.debit_account_id, None)
        credit = self._staged_account(staged, hold.credit_account_id, None)
        assert debit is not None and credit is not None, "a hold's accounts are locked with it"
        # posted <= amount, so posting moves totals from pending to posted without ever
        # raising their sums: no overflow is possible here.
        debit.debits_pending -= hold.amount_minor
        credit.credits_pending -= hold.amount_minor
        debit.debits_posted += posted
        credit.credits_posted += posted
        kind = void_kind or EntryKind.POST
        self._stage_entry(staged, debit, hold.id, kind, -posted, hold.amount_minor)
        self._stage_entry(staged, credit, hold.id, kind, posted, -hold.amount_minor)
        self._commit(staged)
        hold.status = _status_after(kind)
        self.hold_updates[hold.id] = HoldUpdate(
            id=hold.id, status=hold.status, posted_amount_minor=posted
        )
        return Result(code=ResultCode.OK, transfers=(self._hold_view(hold, posted),))

    def _frozen_refusal(self, hold: HoldState) -> risk.Refusal | None:
        for account_id in (hold.debit_account_id, hold.credit_account_id):
            account = self.accounts[account_id]
            refusal = risk.frozen_refusal(account_id, account.risk)
            if refusal is not None:
                self._record(refusal, account_id, hold.amount_minor)
                return refusal
        return None

    # -- step-up --------------------------------------------------------------------------

    def _step_up_payer(self, command: CreateTransfers) -> int | None:
        """The first payer of `command` whose step-up threshold one of its transfers passes."""
        for spec in command.transfers:
            debit = self._visible(spec.debit_account_id, command.scope)
            if debit is not None and risk.needs_step_up(debit.risk, spec.amount_minor):
                return debit.id
        return None

    def _challenge(self, command: CreateTransfers, payer: int) -> Result:
        challenge = NewChallenge(
            id=self.next_id(),
            scope=self.accounts[payer].scope,
            account_id=payer,
            command=command,
            expires_at=self.now + timedelta(seconds=risk.STEP_UP_TTL_S),
        )
        self.challenges_created.append(challenge)
        view = StepUpView(
            id=challenge.id,
            account_id=payer,
            expires_at=challenge.expires_at,
            attempts_max=risk.STEP_UP_ATTEMPTS_MAX,
        )
        return Result(
            code=ResultCode.STEP_UP_REQUIRED,
            detail=f"account {payer} must confirm with the code sent to it",
            step_up=view,
        )

    def _confirm_step_up(self, command: ConfirmStepUp) -> Result:
        challenge = self.challenges.get(command.challenge_id)
        if challenge is None or (command.scope is not None and challenge.scope != command.scope):
            return _failure(ResultCode.STEP_UP_NOT_FOUND, f"no step-up {command.challenge_id}")
        failure = _challenge_failure(challenge, self.now)
        if failure is not None:
            if failure.code is not ResultCode.STEP_UP_ALREADY_CONFIRMED:
                # Tries on a dead or expired step-up are worth a look; a duplicate confirm
                # of a done one is an ordinary retry.
                self._record(failure, challenge.account_id, None)
            return _failure(failure.code, failure.reason)
        if not risk.code_matches(challenge.salt, challenge.code_hash, challenge.id, command.code):
            challenge.attempts += 1
            left = risk.STEP_UP_ATTEMPTS_MAX - challenge.attempts
            if left <= 0:
                challenge.status = StepUpStatus.LOCKED
            self._update_challenge(challenge, None)
            refusal = risk.Refusal(
                ResultCode.STEP_UP_CODE_INVALID,
                f"wrong code for step-up {challenge.id}, {left} attempts left",
            )
            self._record(refusal, challenge.account_id, None)
            return Result(code=refusal.code, detail=refusal.reason, attempts_left=left)
        challenge.status = StepUpStatus.CONFIRMED
        result = self._create_transfers(challenge.command, confirmed=True)
        self._update_challenge(challenge, result.code)
        return result

    def _update_challenge(self, challenge: ChallengeState, result_code: ResultCode | None) -> None:
        self.challenge_updates[challenge.id] = ChallengeUpdate(
            id=challenge.id,
            status=challenge.status,
            attempts=challenge.attempts,
            result_code=result_code,
        )

    def _hold_view(self, hold: HoldState, posted: int) -> TransferView:
        return TransferView(
            id=hold.id,
            debit_account_id=hold.debit_account_id,
            credit_account_id=hold.credit_account_id,
            currency=hold.currency,
            amount_minor=hold.amount_minor,
            posted_amount_minor=posted,
            status=hold.status,
            pending=True,
            group_id=hold.group_id,
            metadata=hold.metadata,
            expires_at=hold.expires_at,
            created_at=hold.created_at,
            resolved_at=self.now,
        )


def _challenge_failure(challenge: ChallengeState, now: datetime) -> risk.Refusal | None:
    if challenge.status is StepUpStatus.CONFIRMED:
        return risk.Refusal(
            ResultCode.STEP_UP_ALREADY_CONFIRMED, f"step-up {challenge.id} was confirmed already"
        )
    if challenge.status is StepUpStatus.LOCKED:
        return risk.Refusal(
            ResultCode.STEP_UP_ATTEMPTS_EXCEEDED,
            f"step-up {challenge.id} got {risk.STEP_UP_ATTEMPTS_MAX} wrong codes and is dead",
        )
    if now >= challenge.expires_at:
        return risk.Refusal(ResultCode.STEP_UP_EXPIRED, f"step-up {challenge.id} expired")
    return None


def _expiry(now: datetime, timeout_s: int | None) -> datetime | None:
    return None if timeout_s is None else now + timedelta(seconds=timeout_s)


def _status_after(kind: EntryKind) -> TransferStatus:
    return {
        EntryKind.POST: TransferStatus.POSTED,
        EntryKind.VOID: TransferStatus.VOIDED,
        EntryKind.EXPIRE: TransferStatus.EXPIRED,
    }[kind]


def _transfer_failure(
    spec: TransferSpec, debit: AccountState | None, credit: AccountState | None
) -> tuple[ResultCode, str] | None:
    """Why `spec` cannot be applied to these (staged) accounts, or None if it can."""
    if spec.debit_account_id == spec.credit_account_id:
        return ResultCode.ACCOUNTS_MUST_DIFFER, "debit and credit accounts are the same"
    if debit is None:
        return ResultCode.ACCOUNT_NOT_FOUND, f"no account {spec.debit_account_id}"
    if credit is None:
        return ResultCode.ACCOUNT_NOT_FOUND, f"no account {spec.credit_account_id}"
    if not debit.currency == credit.currency == spec.currency:
        return (
            ResultCode.CURRENCY_MISMATCH,
            f"transfer in {spec.currency} between accounts in {debit.currency} "
            f"and {credit.currency}",
        )
    amount = spec.amount_minor
    assert 0 < amount <= INT64_MAX, "the caller validates amounts"
    if debit.debits_posted + debit.debits_pending + amount > INT64_MAX or (
        credit.credits_posted + credit.credits_pending + amount > INT64_MAX
    ):
        return ResultCode.OVERFLOW, "an account's totals would overflow"
    if not debit.overdraft_allowed:
        available = debit.credits_posted - debit.debits_posted - debit.debits_pending
        if amount > available:
            return (
                ResultCode.INSUFFICIENT_FUNDS,
                f"account {debit.id} has {available} available, {amount} needed",
            )
    return None


def _resolution_failure(
    hold: HoldState, now: datetime, post_amount: int | None, void_kind: EntryKind | None
) -> tuple[ResultCode, str] | None:
    assert post_amount is None or 0 < post_amount <= INT64_MAX, "the caller validates amounts"
    if not hold.pending:
        return ResultCode.TRANSFER_NOT_PENDING, f"transfer {hold.id} is not a pending transfer"
    if hold.status is TransferStatus.EXPIRED:
        # The same answer whether or not the sweeper has got to the hold yet.
        return ResultCode.PENDING_TRANSFER_EXPIRED, f"transfer {hold.id} expired"
    if hold.status is not TransferStatus.PENDING:
        return (
            ResultCode.TRANSFER_ALREADY_RESOLVED,
            f"transfer {hold.id} is already {hold.status.value}",
        )
    expired = hold.expires_at is not None and now >= hold.expires_at
    if expired and void_kind is not EntryKind.EXPIRE:
        # Past its timeout a hold belongs to the sweeper, so an expired hold is always
        # recorded as expired, whichever request came first.
        return ResultCode.PENDING_TRANSFER_EXPIRED, f"transfer {hold.id} expired"
    if void_kind is EntryKind.EXPIRE and not expired:
        return ResultCode.TRANSFER_NOT_PENDING, f"transfer {hold.id} has not expired"
    if post_amount is not None and post_amount > hold.amount_minor:
        return (
            ResultCode.POST_AMOUNT_EXCEEDS_PENDING,
            f"cannot post {post_amount} of a {hold.amount_minor} hold",
        )
    return None
