"""Tests for engine.rules: the pure decision of a batch, without a database.

`Ledger` plays the store: it hands `apply_batch` exactly the accounts and holds the store
would lock, writes the plan back the way the store does, and checks on every batch that the
inputs were not changed and that the plan only updates rows that existed before it.
The unit tests cover one rule or failure code each; `LedgerMachine` feeds random streams of
batches through the same `Ledger` and checks the ledger's invariants after every batch.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from engine.model import (
    INT64_MAX,
    PRODUCT_METADATA_KEY,
    AccountKind,
    Command,
    CreateAccount,
    CreateTransfers,
    EntryKind,
    PostPending,
    Result,
    ResultCode,
    TransferSpec,
    TransferStatus,
    VoidPending,
    decode_result,
    encode_result,
)
from engine.rules import AccountState, BatchPlan, EntryRow, HoldState, apply_batch

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
EUR = "EUR"
USD = "USD"
USER = AccountKind.USER
MERCHANT = AccountKind.MERCHANT
SYSTEM = AccountKind.SYSTEM
OK = ResultCode.OK
UNKNOWN_ID = 10**15  # never minted: the counter starts at 1 and tests mint far fewer ids


class Ledger:
    """A store in memory: carries accounts, transfers and entries from batch to batch."""

    def __init__(self) -> None:
        self.accounts: dict[int, AccountState] = {}
        self.transfers: dict[int, HoldState] = {}  # every transfer, as the store's table
        self.posted_amount: dict[int, int] = {}
        self.entries: dict[int, list[EntryRow]] = defaultdict(list)
        self.now = T0
        self._ids = itertools.count(1)
        self.minted: list[int] = []
        self._system: dict[str, int] = {}
        self.last: BatchPlan | None = None

    def next_id(self) -> int:
        new = next(self._ids)
        self.minted.append(new)
        return new

    def locked_for(
        self, commands: Sequence[Command]
    ) -> tuple[dict[int, AccountState], dict[int, HoldState]]:
        """What engine.store locks for `commands`: holds named, then accounts named by
        transfers or by those holds. Ids that do not exist are simply absent."""
        hold_ids = {c.transfer_id for c in commands if isinstance(c, PostPending | VoidPending)}
        holds = {i: copy.deepcopy(self.transfers[i]) for i in hold_ids if i in self.transfers}
        account_ids: set[int] = set()
        for command in commands:
            if isinstance(command, CreateTransfers):
                for spec in command.transfers:
                    account_ids |= {spec.debit_account_id, spec.credit_account_id}
        for hold in holds.values():
            account_ids |= {hold.debit_account_id, hold.credit_account_id}
        accounts = {
            i: dataclasses.replace(self.accounts[i]) for i in account_ids if i in self.accounts
        }
        return accounts, holds

    def run(self, *commands: Command) -> BatchPlan:
        accounts, holds = self.locked_for(commands)
        accounts_before, holds_before = copy.deepcopy(accounts), copy.deepcopy(holds)
        minted_before = len(self.minted)
        plan = apply_batch(list(commands), accounts, holds, now=self.now, next_id=self.next_id)
        assert accounts == accounts_before, "apply_batch changed the accounts it was given"
        assert holds == holds_before, "apply_batch changed the holds it was given"
        assert len(plan.results) == len(commands)
        # The store writes balances and hold changes with UPDATE, in the same statement that
        # inserts new rows, so a plan may only update rows that existed before the batch.
        assert set(plan.accounts_changed) <= set(accounts)
        assert all(i == a.id for i, a in plan.accounts_changed.items())
        updated = [u.id for u in plan.hold_updates]
        assert len(updated) == len(set(updated)) and set(updated) <= set(holds)
        self._check_ids(plan, set(self.minted[minted_before:]))
        self.write(plan)
        self.last = plan
        return plan

    def _check_ids(self, plan: BatchPlan, minted: set[int]) -> None:
        transfer_views = [t for t, _ in plan.transfers_created]
        ids = [a.id for a, _ in plan.accounts_created]
        ids += [t.id for t in transfer_views]
        ids += [e.id for e in plan.entries]
        ids += sorted({t.group_id for t in transfer_views if t.group_id is not None})
        assert len(ids) == len(set(ids)), "an id was used twice"
        assert set(ids) <= minted, "the plan names an id it did not mint"

    def write(self, plan: BatchPlan) -> None:
        for account, _metadata in plan.accounts_created:
            assert account.id not in self.accounts
            self.accounts[account.id] = dataclasses.replace(account)
        for account in plan.accounts_changed.values():
            self.accounts[account.id] = dataclasses.replace(account)
        for view, scope in plan.transfers_created:
            assert view.id not in self.transfers
            self.transfers[view.id] = HoldState(
                id=view.id,
                debit_account_id=view.debit_account_id,
                credit_account_id=view.credit_account_id,
                currency=view.currency,
                amount_minor=view.amount_minor,
                status=view.status,
                pending=view.pending,
                scope=scope,
                group_id=view.group_id,
                metadata=view.metadata,
                expires_at=view.expires_at,
                created_at=view.created_at,
            )
            self.posted_amount[view.id] = view.posted_amount_minor
        for update in plan.hold_updates:
            self.transfers[update.id].status = update.status
            self.posted_amount[update.id] = update.posted_amount_minor
        for entry in plan.entries:
            self.entries[entry.account_id].append(entry)

    # -- helpers for the unit tests --------------------------------------------------------

    def one(self, command: Command) -> Result:
        [result] = self.run(command).results
        return result

    def open(self, kind: AccountKind = USER, currency: str = EUR, scope: str | None = "a") -> int:
        result = self.one(CreateAccount(currency=currency, kind=kind, scope=scope))
        assert result.ok and result.account is not None
        return result.account.id

    def system(self, currency: str = EUR) -> int:
        if currency not in self._system:
            self._system[currency] = self.open(SYSTEM, currency, scope=None)
        return self._system[currency]

    def spec(
        self,
        debit: int,
        credit: int,
        amount: int,
        *,
        currency: str | None = None,
        pending: bool = False,
        timeout_s: int | None = None,
    ) -> TransferSpec:
        return TransferSpec(
            debit_account_id=debit,
            credit_account_id=credit,
            amount_minor=amount,
            currency=currency or self.accounts[debit].currency,
            pending=pending,
            timeout_s=timeout_s,
        )

    def xfer(
        self,
        debit: int,
        credit: int,
        amount: int,
        *,
        scope: str | None = None,
        currency: str | None = None,
        pending: bool = False,
        timeout_s: int | None = None,
    ) -> CreateTransfers:
        spec = self.spec(
            debit, credit, amount, currency=currency, pending=pending, timeout_s=timeout_s
        )
        return CreateTransfers(transfers=(spec,), scope=scope)

    def fund(self, account_id: int, amount: int) -> None:
        currency = self.accounts[account_id].currency
        assert self.one(self.xfer(self.system(currency), account_id, amount)).ok

    def hold(self, debit: int, credit: int, amount: int, timeout_s: int | None = None) -> int:
        result = self.one(self.xfer(debit, credit, amount, pending=True, timeout_s=timeout_s))
        assert result.ok
        return result.transfers[0].id

    def totals(self, account_id: int) -> tuple[int, int, int, int]:
        a = self.accounts[account_id]
        return a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending

    def available(self, account_id: int) -> int:
        a = self.accounts[account_id]
        return a.credits_posted - a.debits_posted - a.debits_pending


def rows(plan: BatchPlan) -> list[tuple[int, EntryKind, int, int, int, int]]:
    """A plan's entries as (account, kind, posted delta, pending delta, posted, pending)."""
    return [
        (
            e.account_id,
            e.kind,
            e.posted_delta_minor,
            e.pending_delta_minor,
            e.posted_after_minor,
            e.pending_after_minor,
        )
        for e in plan.entries
    ]


def assert_nothing_written(plan: BatchPlan) -> None:
    assert plan.entries == []
    assert plan.transfers_created == []
    assert plan.hold_updates == []
    assert plan.accounts_changed == {}


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def funded(ledger: Ledger) -> tuple[Ledger, int, int]:
    """A ledger with user 1000 EUR richer and an empty merchant, both in scope "a"."""
    user, merchant = ledger.open(USER), ledger.open(MERCHANT)
    ledger.fund(user, 1000)
    return ledger, user, merchant


# ---------------------------------------------------------------------------------------
# Accounts


@pytest.mark.parametrize("kind", list(AccountKind))
def test_create_account(ledger: Ledger, kind: AccountKind) -> None:
    command = CreateAccount(currency=USD, kind=kind, metadata={"k": "v"}, scope="a")
    plan = ledger.run(command)
    [result] = plan.results
    assert result.ok and result.account is not None
    view = result.account
    assert (view.currency, view.kind, view.metadata, view.created_at) == (USD, kind, {"k": "v"}, T0)
    assert view.overdraft_allowed is (kind is SYSTEM)
    assert (view.posted_minor, view.pending_minor, view.available_minor) == (0, 0, 0)
    [(state, metadata)] = plan.accounts_created
    assert (state.id, state.scope, metadata) == (view.id, "a", {"k": "v"})
    assert plan.accounts_changed == {} and plan.entries == []


def test_operator_account_has_empty_scope(ledger: Ledger) -> None:
    account_id = ledger.open(SYSTEM, scope=None)
    assert ledger.accounts[account_id].scope == ""


def test_account_created_in_a_batch_is_not_visible_to_later_commands_of_it(
    ledger: Ledger,
) -> None:
    # The store inserts new accounts and updates balances in one statement; an UPDATE there
    # cannot see a row inserted by it, so crediting a brand-new account would be lost.
    system = ledger.system()
    next_account_id = ledger.minted[-1] + 1
    plan = ledger.run(
        CreateAccount(currency=EUR, kind=USER, scope="a"),
        ledger.xfer(system, next_account_id, 500),
    )
    created, transfer = plan.results
    assert created.ok and created.account is not None
    assert created.account.id == next_account_id
    assert transfer.code is ResultCode.ACCOUNT_NOT_FOUND
    assert plan.accounts_changed == {} and plan.entries == []
    # In the next batch it is there.
    assert ledger.one(ledger.xfer(system, next_account_id, 500)).ok
    assert ledger.accounts[next_account_id].posted == 500


# ---------------------------------------------------------------------------------------
# Immediate transfers


def test_immediate_transfer(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    plan = ledger.run(ledger.xfer(user, merchant, 300, scope="a"))
    [result] = plan.results
    assert result.ok
    [view] = result.transfers
    assert (view.debit_account_id, view.credit_account_id, view.amount_minor) == (
        user,
        merchant,
        300,
    )
    assert view.status is TransferStatus.POSTED and view.posted_amount_minor == 300
    assert view.pending is False and view.group_id is None and view.expires_at is None
    assert view.created_at == T0 and view.resolved_at is None
    assert plan.transfers_created == [(view, "a")]
    assert ledger.totals(user) == (300, 1000, 0, 0)
    assert ledger.totals(merchant) == (0, 300, 0, 0)
    assert rows(plan) == [
        (user, EntryKind.TRANSFER, -300, 0, 700, 0),
        (merchant, EntryKind.TRANSFER, 300, 0, 300, 0),
    ]
    assert all(e.transfer_id == view.id for e in plan.entries)


def test_transfer_of_exactly_the_available_amount(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    assert ledger.one(ledger.xfer(user, merchant, 1000)).ok
    assert ledger.available(user) == 0


def test_accounts_must_differ(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, _ = funded
    plan = ledger.run(ledger.xfer(user, user, 1))
    assert plan.results[0].code is ResultCode.ACCOUNTS_MUST_DIFFER
    assert_nothing_written(plan)


# ---------------------------------------------------------------------------------------
# Holds


def test_hold_then_post_in_full(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    plan = ledger.run(ledger.xfer(user, merchant, 400, pending=True, timeout_s=60))
    [view] = plan.results[0].transfers
    assert view.status is TransferStatus.PENDING and view.pending
    assert view.posted_amount_minor == 0 and view.expires_at == T0 + timedelta(seconds=60)
    assert ledger.totals(user) == (0, 1000, 400, 0)
    assert ledger.totals(merchant) == (0, 0, 0, 400)
    assert ledger.available(user) == 600
    assert rows(plan) == [
        (user, EntryKind.HOLD, 0, -400, 1000, -400),
        (merchant, EntryKind.HOLD, 0, 400, 0, 400),
    ]

    ledger.now = T0 + timedelta(seconds=30)
    plan = ledger.run(PostPending(transfer_id=view.id, scope="a"))
    [result] = plan.results
    assert result.ok
    [posted] = result.transfers
    assert posted.id == view.id and posted.status is TransferStatus.POSTED
    assert posted.posted_amount_minor == 400 and posted.resolved_at == ledger.now
    assert posted.created_at == T0 and posted.expires_at == view.expires_at
    assert ledger.totals(user) == (400, 1000, 0, 0)
    assert ledger.totals(merchant) == (0, 400, 0, 0)
    assert rows(plan) == [
        (user, EntryKind.POST, -400, 400, 600, 0),
        (merchant, EntryKind.POST, 400, -400, 400, 0),
    ]
    assert [dataclasses.astuple(u) for u in plan.hold_updates] == [
        (view.id, TransferStatus.POSTED, 400)
    ]
    assert plan.transfers_created == []


def test_post_in_part_releases_the_rest(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 400)
    plan = ledger.run(PostPending(transfer_id=hold, amount_minor=150))
    [posted] = plan.results[0].transfers
    assert posted.status is TransferStatus.POSTED and posted.posted_amount_minor == 150
    assert posted.amount_minor == 400
    assert ledger.totals(user) == (150, 1000, 0, 0)
    assert ledger.totals(merchant) == (0, 150, 0, 0)
    assert ledger.available(user) == 850
    assert rows(plan) == [
        (user, EntryKind.POST, -150, 400, 850, 0),
        (merchant, EntryKind.POST, 150, -400, 150, 0),
    ]


def test_void_releases_the_hold(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 400, timeout_s=60)
    plan = ledger.run(VoidPending(transfer_id=hold, scope="a"))
    [voided] = plan.results[0].transfers
    assert voided.status is TransferStatus.VOIDED and voided.posted_amount_minor == 0
    assert ledger.totals(user) == (0, 1000, 0, 0)
    assert ledger.totals(merchant) == (0, 0, 0, 0)
    assert rows(plan) == [
        (user, EntryKind.VOID, 0, 400, 1000, 0),
        (merchant, EntryKind.VOID, 0, -400, 0, 0),
    ]
    assert ledger.transfers[hold].status is TransferStatus.VOIDED


def test_expire_only_once_the_timeout_has_passed(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 400, timeout_s=60)
    expires_at = T0 + timedelta(seconds=60)

    for early in (T0, expires_at - timedelta(microseconds=1)):
        ledger.now = early
        plan = ledger.run(VoidPending(transfer_id=hold, expired=True))
        assert plan.results[0].code is ResultCode.TRANSFER_NOT_PENDING
        assert_nothing_written(plan)
        assert ledger.transfers[hold].status is TransferStatus.PENDING

    ledger.now = expires_at + timedelta(seconds=5)
    plan = ledger.run(VoidPending(transfer_id=hold, expired=True))
    [expired] = plan.results[0].transfers
    assert expired.status is TransferStatus.EXPIRED and expired.posted_amount_minor == 0
    assert expired.resolved_at == ledger.now
    assert rows(plan) == [
        (user, EntryKind.EXPIRE, 0, 400, 1000, 0),
        (merchant, EntryKind.EXPIRE, 0, -400, 0, 0),
    ]
    assert ledger.totals(user) == (0, 1000, 0, 0)
    assert ledger.transfers[hold].status is TransferStatus.EXPIRED
    for command in (PostPending(transfer_id=hold), VoidPending(transfer_id=hold)):
        plan = ledger.run(command)
        assert plan.results[0].code is ResultCode.PENDING_TRANSFER_EXPIRED
        assert_nothing_written(plan)


def test_expiry_is_due_at_expires_at(funded: tuple[Ledger, int, int]) -> None:
    # The boundary is the same for the sweeper and for posts and voids: at expires_at the
    # hold belongs to the sweeper.
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 400, timeout_s=60)
    ledger.now = T0 + timedelta(seconds=60)
    plan = ledger.run(PostPending(transfer_id=hold), VoidPending(transfer_id=hold, expired=True))
    assert [r.code for r in plan.results] == [ResultCode.PENDING_TRANSFER_EXPIRED, OK]


def test_hold_without_timeout_never_expires(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 400)
    assert ledger.transfers[hold].expires_at is None
    ledger.now = T0 + timedelta(days=3650)
    assert ledger.one(VoidPending(transfer_id=hold, expired=True)).code is (
        ResultCode.TRANSFER_NOT_PENDING
    )
    assert ledger.one(PostPending(transfer_id=hold)).ok


@pytest.mark.parametrize(
    "command",
    [PostPending, VoidPending],
    ids=["post", "void"],
)
def test_post_or_void_after_expiry_fails(
    funded: tuple[Ledger, int, int], command: type[PostPending] | type[VoidPending]
) -> None:
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 400, timeout_s=60)
    ledger.now = T0 + timedelta(seconds=61)
    plan = ledger.run(command(transfer_id=hold))
    assert plan.results[0].code is ResultCode.PENDING_TRANSFER_EXPIRED
    assert_nothing_written(plan)
    assert ledger.transfers[hold].status is TransferStatus.PENDING
    assert ledger.available(user) == 600  # still held until the sweeper expires it


def _resolution(name: str, hold: int) -> Command:
    return {
        "post": PostPending(transfer_id=hold),
        "post_part": PostPending(transfer_id=hold, amount_minor=1),
        "void": VoidPending(transfer_id=hold),
        "expire": VoidPending(transfer_id=hold, expired=True),
    }[name]


@pytest.mark.parametrize("first", ["post", "post_part", "void", "expire"])
@pytest.mark.parametrize("second", ["post", "post_part", "void", "expire"])
@pytest.mark.parametrize("same_batch", [False, True])
def test_second_resolution_is_already_resolved(
    funded: tuple[Ledger, int, int], first: str, second: str, same_batch: bool
) -> None:
    """A hold resolves once. Once expired, it answers that it expired, as it would before the
    sweeper got to it; otherwise a second resolution is TRANSFER_ALREADY_RESOLVED."""
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 400, timeout_s=60)
    if first == "expire":
        ledger.now = T0 + timedelta(seconds=60)
    if same_batch:
        plan = ledger.run(_resolution(first, hold), _resolution(second, hold))
        codes = [r.code for r in plan.results]
        assert len(plan.hold_updates) == 1 and len(plan.entries) == 2
    else:
        codes = [ledger.one(_resolution(first, hold)).code]
        plan = ledger.run(_resolution(second, hold))
        codes += [r.code for r in plan.results]
        assert_nothing_written(plan)
    again = (
        ResultCode.PENDING_TRANSFER_EXPIRED
        if first == "expire"
        else ResultCode.TRANSFER_ALREADY_RESOLVED
    )
    assert codes == [OK, again]
    assert ledger.transfers[hold].status is _resolution_status(first)


def _resolution_status(name: str) -> TransferStatus:
    return {
        "post": TransferStatus.POSTED,
        "post_part": TransferStatus.POSTED,
        "void": TransferStatus.VOIDED,
        "expire": TransferStatus.EXPIRED,
    }[name]


@pytest.mark.parametrize("name", ["post", "post_part", "void", "expire"])
def test_resolving_an_immediate_transfer_is_not_pending(
    funded: tuple[Ledger, int, int], name: str
) -> None:
    ledger, user, merchant = funded
    transfer = ledger.one(ledger.xfer(user, merchant, 100)).transfers[0].id
    plan = ledger.run(_resolution(name, transfer))
    assert plan.results[0].code is ResultCode.TRANSFER_NOT_PENDING
    assert_nothing_written(plan)


def test_post_amount_above_the_hold(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 400)
    plan = ledger.run(PostPending(transfer_id=hold, amount_minor=401))
    assert plan.results[0].code is ResultCode.POST_AMOUNT_EXCEEDS_PENDING
    assert_nothing_written(plan)
    assert ledger.one(PostPending(transfer_id=hold, amount_minor=400)).ok


def test_resolving_an_unknown_transfer(ledger: Ledger) -> None:
    for command in (PostPending(transfer_id=UNKNOWN_ID), VoidPending(transfer_id=UNKNOWN_ID)):
        plan = ledger.run(command)
        assert plan.results[0].code is ResultCode.TRANSFER_NOT_FOUND
        assert_nothing_written(plan)


def test_hold_made_in_a_batch_cannot_be_resolved_in_it(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    next_transfer_id = ledger.minted[-1] + 1
    plan = ledger.run(
        ledger.xfer(user, merchant, 400, pending=True),
        PostPending(transfer_id=next_transfer_id),
    )
    assert plan.results[0].transfers[0].id == next_transfer_id
    assert plan.results[1].code is ResultCode.TRANSFER_NOT_FOUND
    assert plan.hold_updates == []


# ---------------------------------------------------------------------------------------
# Funds


def test_insufficient_funds(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    plan = ledger.run(ledger.xfer(user, merchant, 1001))
    [result] = plan.results
    assert result.code is ResultCode.INSUFFICIENT_FUNDS and result.failed_index == 0
    assert_nothing_written(plan)
    assert ledger.totals(user) == (0, 1000, 0, 0)


def test_outgoing_holds_are_spoken_for(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    ledger.hold(user, merchant, 700)
    for pending in (False, True):
        assert ledger.one(ledger.xfer(user, merchant, 301, pending=pending)).code is (
            ResultCode.INSUFFICIENT_FUNDS
        )
    assert ledger.one(ledger.xfer(user, merchant, 300)).ok


def test_incoming_holds_are_not_spendable(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    ledger.hold(user, merchant, 700)
    other = ledger.open(USER)
    assert ledger.accounts[merchant].credits_pending == 700
    assert ledger.one(ledger.xfer(merchant, other, 1)).code is ResultCode.INSUFFICIENT_FUNDS


def test_posted_hold_money_is_spendable(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 700)
    other = ledger.open(USER)
    assert ledger.one(PostPending(transfer_id=hold, amount_minor=200)).ok
    assert ledger.one(ledger.xfer(merchant, other, 201)).code is ResultCode.INSUFFICIENT_FUNDS
    assert ledger.one(ledger.xfer(merchant, other, 200)).ok
    assert ledger.available(user) == 800


@pytest.mark.parametrize("pending", [False, True])
def test_system_accounts_may_go_negative(ledger: Ledger, pending: bool) -> None:
    system, user = ledger.system(), ledger.open(USER)
    plan = ledger.run(ledger.xfer(system, user, 5_000, pending=pending))
    assert plan.results[0].ok
    assert ledger.accounts[system].posted + ledger.accounts[system].pending == -5_000
    assert ledger.accounts[user].posted + ledger.accounts[user].pending == 5_000


@pytest.mark.parametrize(
    ("debit_currency", "credit_currency", "spec_currency"),
    [(EUR, USD, EUR), (EUR, USD, USD), (EUR, EUR, USD)],
)
def test_currency_mismatch(
    ledger: Ledger, debit_currency: str, credit_currency: str, spec_currency: str
) -> None:
    debit, credit = ledger.system(debit_currency), ledger.open(USER, credit_currency)
    plan = ledger.run(ledger.xfer(debit, credit, 10, currency=spec_currency))
    assert plan.results[0].code is ResultCode.CURRENCY_MISMATCH
    assert_nothing_written(plan)


@pytest.mark.parametrize("side", ["debit", "credit"])
def test_account_not_found(funded: tuple[Ledger, int, int], side: str) -> None:
    ledger, user, _ = funded
    debit, credit = (UNKNOWN_ID, user) if side == "debit" else (user, UNKNOWN_ID)
    plan = ledger.run(ledger.xfer(debit, credit, 10, currency=EUR))
    assert plan.results[0].code is ResultCode.ACCOUNT_NOT_FOUND
    assert_nothing_written(plan)


# ---------------------------------------------------------------------------------------
# Scopes


def test_scope_isolation(ledger: Ledger) -> None:
    alice, alice_shop = ledger.open(USER, scope="a"), ledger.open(MERCHANT, scope="a")
    bob = ledger.open(USER, scope="b")
    ledger.fund(alice, 1000)
    ledger.fund(bob, 1000)

    # A caller sees only its own accounts, as debit or as credit.
    for debit, credit in ((bob, alice), (alice, bob)):
        result = ledger.one(ledger.xfer(debit, credit, 10, scope="a"))
        assert result.code is ResultCode.ACCOUNT_NOT_FOUND
    # Operator accounts (scope "") are no caller's.
    result = ledger.one(ledger.xfer(ledger.system(), alice, 10, scope="a"))
    assert result.code is ResultCode.ACCOUNT_NOT_FOUND
    assert ledger.one(ledger.xfer(alice, alice_shop, 10, scope="a")).ok

    # A hold belongs to its debit account's scope.
    hold = ledger.hold(alice, alice_shop, 100)
    assert ledger.transfers[hold].scope == "a"
    for command in (
        PostPending(transfer_id=hold, scope="b"),
        VoidPending(transfer_id=hold, scope="b"),
    ):
        plan = ledger.run(command)
        assert plan.results[0].code is ResultCode.TRANSFER_NOT_FOUND
        assert_nothing_written(plan)
    assert ledger.one(PostPending(transfer_id=hold, amount_minor=10, scope="a")).ok

    # The operator sees everything, and its transfers keep the debit account's scope.
    plan = ledger.run(ledger.xfer(bob, alice, 10, scope=None))
    assert plan.results[0].ok and plan.transfers_created[0][1] == "b"
    hold = ledger.hold(bob, alice, 100)
    assert ledger.one(VoidPending(transfer_id=hold, scope=None)).ok


def test_a_products_hold_is_resolved_only_by_the_operator(
    funded: tuple[Ledger, int, int],
) -> None:
    ledger, user, merchant = funded
    spec = msgspec.structs.replace(
        ledger.spec(user, merchant, 400, pending=True), metadata={PRODUCT_METADATA_KEY: "trade"}
    )
    [hold] = ledger.one(CreateTransfers(transfers=(spec,), scope="a")).transfers
    for command in (
        PostPending(transfer_id=hold.id, scope="a"),
        VoidPending(transfer_id=hold.id, scope="a"),
    ):
        plan = ledger.run(command)
        assert plan.results[0].code is ResultCode.TRANSFER_HELD_BY_PRODUCT
        assert_nothing_written(plan)
    assert ledger.one(PostPending(transfer_id=hold.id, scope=None)).ok


# ---------------------------------------------------------------------------------------
# Overflow


def test_overflow_of_credits(ledger: Ledger) -> None:
    user = ledger.open(USER)
    ledger.fund(user, INT64_MAX - 10)
    system = ledger.open(SYSTEM, scope=None)  # a second one, far from its own limits
    ledger.hold(system, user, 5)
    assert ledger.one(ledger.xfer(system, user, 6)).code is ResultCode.OVERFLOW
    assert ledger.one(ledger.xfer(system, user, 6, pending=True)).code is ResultCode.OVERFLOW
    assert ledger.one(ledger.xfer(system, user, 5)).ok
    assert ledger.accounts[user].credits_posted + ledger.accounts[user].credits_pending == (
        INT64_MAX
    )


def test_overflow_of_debits(ledger: Ledger) -> None:
    system, user, other = ledger.system(), ledger.open(USER), ledger.open(USER)
    ledger.fund(user, INT64_MAX - 1)
    plan = ledger.run(ledger.xfer(system, other, 2))
    assert plan.results[0].code is ResultCode.OVERFLOW
    assert_nothing_written(plan)
    assert ledger.one(ledger.xfer(system, other, 1, pending=True)).ok
    assert ledger.one(ledger.xfer(system, other, 1)).code is ResultCode.OVERFLOW
    assert ledger.accounts[system].debits_posted + ledger.accounts[system].debits_pending == (
        INT64_MAX
    )


def test_transfer_of_int64_max(ledger: Ledger) -> None:
    system, user = ledger.system(), ledger.open(USER)
    assert ledger.one(ledger.xfer(system, user, INT64_MAX, pending=True)).ok
    assert ledger.accounts[user].credits_pending == INT64_MAX
    [hold] = [i for i, t in ledger.transfers.items() if t.pending]
    assert ledger.one(PostPending(transfer_id=hold)).ok
    assert ledger.accounts[user].posted == INT64_MAX
    assert ledger.accounts[system].posted == -INT64_MAX


# ---------------------------------------------------------------------------------------
# Linked groups


def test_linked_group_is_all_or_nothing(ledger: Ledger) -> None:
    user, shop, other = ledger.open(USER), ledger.open(MERCHANT), ledger.open(USER)
    ledger.fund(user, 100)
    group = CreateTransfers(
        transfers=(
            ledger.spec(user, shop, 60),
            ledger.spec(user, other, 30, pending=True),
            ledger.spec(user, shop, 20),  # 10 short: fails
            ledger.spec(user, UNKNOWN_ID, 1, currency=EUR),  # would fail too
        ),
        linked=True,
    )
    before = copy.deepcopy(ledger.accounts)
    plan = ledger.run(group)
    [result] = plan.results
    assert result.code is ResultCode.INSUFFICIENT_FUNDS
    assert result.failed_index == 2 and result.transfers == ()
    assert "transfer 2 of the linked group failed" in result.detail
    assert_nothing_written(plan)
    assert ledger.accounts == before


def test_linked_group_reports_its_first_failure(ledger: Ledger) -> None:
    user, shop = ledger.open(USER), ledger.open(MERCHANT)
    group = CreateTransfers(
        transfers=(
            ledger.spec(user, shop, 1, currency=USD),
            ledger.spec(user, shop, 1),
        ),
        linked=True,
    )
    [result] = ledger.run(group).results
    assert (result.code, result.failed_index) == (ResultCode.CURRENCY_MISMATCH, 0)


def test_linked_group_succeeds_together_with_one_group_id(ledger: Ledger) -> None:
    user, shop, other = ledger.open(USER), ledger.open(MERCHANT), ledger.open(USER)
    system = ledger.system()
    group = CreateTransfers(
        transfers=(
            ledger.spec(system, user, 100),
            ledger.spec(user, shop, 70),  # spends what the first one credited
            ledger.spec(user, other, 30, pending=True, timeout_s=10),
        ),
        linked=True,
    )
    plan = ledger.run(group)
    [result] = plan.results
    assert result.ok and result.failed_index is None
    views = result.transfers
    assert len(views) == 3 and [t for t, _ in plan.transfers_created] == list(views)
    group_ids = {t.group_id for t in views}
    assert len(group_ids) == 1 and None not in group_ids
    assert group_ids.isdisjoint(t.id for t in views)
    assert [t.status for t in views] == [TransferStatus.POSTED] * 2 + [TransferStatus.PENDING]
    assert ledger.totals(user) == (70, 100, 30, 0)
    assert [r for r in rows(plan) if r[0] == user] == [
        (user, EntryKind.TRANSFER, 100, 0, 100, 0),
        (user, EntryKind.TRANSFER, -70, 0, 30, 0),
        (user, EntryKind.HOLD, 0, -30, 30, -30),
    ]
    # A single unlinked transfer has no group.
    assert ledger.one(ledger.xfer(system, user, 1)).transfers[0].group_id is None


def test_failed_linked_group_does_not_hold_back_the_rest_of_the_batch(ledger: Ledger) -> None:
    user, shop = ledger.open(USER), ledger.open(MERCHANT)
    ledger.fund(user, 100)
    failing = CreateTransfers(
        transfers=(ledger.spec(user, shop, 100), ledger.spec(user, shop, 1)), linked=True
    )
    plan = ledger.run(failing, ledger.xfer(user, shop, 100))
    assert [r.code for r in plan.results] == [ResultCode.INSUFFICIENT_FUNDS, OK]
    assert plan.results[0].failed_index == 1
    assert ledger.totals(user) == (100, 100, 0, 0)
    assert len(plan.entries) == 2 and len(plan.transfers_created) == 1


# ---------------------------------------------------------------------------------------
# Batches


def test_insufficient_transfer_fails_alone_in_its_batch(ledger: Ledger) -> None:
    user, shop, other = ledger.open(USER), ledger.open(MERCHANT), ledger.open(USER)
    system = ledger.system()
    plan = ledger.run(
        ledger.xfer(user, shop, 50),  # nothing there yet
        ledger.xfer(system, user, 100),
        ledger.xfer(user, shop, 150),  # too much
        ledger.xfer(user, shop, 60),  # uses money credited earlier in the batch
        ledger.xfer(user, other, 40, pending=True),
        ledger.xfer(user, other, 1),  # the hold took the rest
        ledger.xfer(shop, other, 60),  # spends what the shop got in this batch
    )
    assert [r.code for r in plan.results] == [
        ResultCode.INSUFFICIENT_FUNDS,
        OK,
        ResultCode.INSUFFICIENT_FUNDS,
        OK,
        OK,
        ResultCode.INSUFFICIENT_FUNDS,
        OK,
    ]
    assert ledger.totals(user) == (60, 100, 40, 0)
    assert ledger.totals(shop) == (60, 60, 0, 0)
    assert ledger.totals(other) == (0, 60, 0, 40)
    assert len(plan.transfers_created) == 4 and len(plan.entries) == 8


def test_entries_carry_running_balances(ledger: Ledger) -> None:
    user, shop = ledger.open(USER), ledger.open(MERCHANT)
    system = ledger.system()
    ledger.fund(user, 500)
    hold = ledger.hold(user, shop, 200)
    plan = ledger.run(
        ledger.xfer(user, shop, 100),
        PostPending(transfer_id=hold, amount_minor=50),
        ledger.xfer(system, user, 25, pending=True),
        ledger.xfer(shop, user, 10),
    )
    assert all(r.ok for r in plan.results)
    assert [r for r in rows(plan) if r[0] == user] == [
        (user, EntryKind.TRANSFER, -100, 0, 400, -200),
        (user, EntryKind.POST, -50, 200, 350, 0),
        (user, EntryKind.HOLD, 0, 25, 350, 25),
        (user, EntryKind.TRANSFER, 10, 0, 360, 25),
    ]
    assert [r for r in rows(plan) if r[0] == shop] == [
        (shop, EntryKind.TRANSFER, 100, 0, 100, 200),
        (shop, EntryKind.POST, 50, -200, 150, 0),
        (shop, EntryKind.TRANSFER, -10, 0, 140, 0),
    ]
    ids = [e.id for e in plan.entries]
    assert ids == sorted(ids)


def test_each_touched_account_is_changed_once(ledger: Ledger) -> None:
    user, shop, untouched = ledger.open(USER), ledger.open(MERCHANT), ledger.open(USER)
    system = ledger.system()
    ledger.fund(user, 1000)
    hold = ledger.hold(user, shop, 100)
    plan = ledger.run(
        *(ledger.xfer(user, shop, 10) for _ in range(5)),
        VoidPending(transfer_id=hold),
        ledger.xfer(user, untouched, 5_000),  # fails: touches nothing
        CreateAccount(currency=EUR, kind=USER),
    )
    assert list(plan.accounts_changed) == sorted([user, shop])
    assert plan.accounts_changed[user].debits_posted == 50
    assert plan.accounts_changed[user].debits_pending == 0
    assert plan.accounts_changed[shop].credits_posted == 50
    assert system not in plan.accounts_changed


def test_inputs_are_not_mutated(ledger: Ledger) -> None:
    user, shop = ledger.open(USER), ledger.open(MERCHANT)
    system = ledger.system()
    ledger.fund(user, 1000)
    first, second = ledger.hold(user, shop, 100), ledger.hold(user, shop, 100, timeout_s=1)
    accounts = copy.deepcopy(ledger.accounts)
    holds = copy.deepcopy(ledger.transfers)
    snapshot = copy.deepcopy((accounts, holds))
    commands: list[Command] = [
        ledger.xfer(user, shop, 100),
        ledger.xfer(system, user, 100, pending=True),
        PostPending(transfer_id=first, amount_minor=30),
        VoidPending(transfer_id=second, expired=True),
        CreateAccount(currency=EUR, kind=USER),
    ]
    plan = apply_batch(
        commands, accounts, holds, now=T0 + timedelta(seconds=5), next_id=ledger.next_id
    )
    assert all(r.ok for r in plan.results)
    assert (accounts, holds) == snapshot
    assert all(plan.accounts_changed[i] is not accounts[i] for i in plan.accounts_changed)


def test_results_survive_the_idempotency_store(funded: tuple[Ledger, int, int]) -> None:
    ledger, user, merchant = funded
    hold = ledger.hold(user, merchant, 10, timeout_s=5)
    plan = ledger.run(
        CreateAccount(currency=EUR, kind=USER, metadata={"a": "b"}),
        ledger.xfer(user, merchant, 1, pending=True),
        PostPending(transfer_id=hold),
        ledger.xfer(user, merchant, 10**6),
    )
    for result in plan.results:
        decoded = decode_result(encode_result(result))
        assert decoded == result
        assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(result)


# ---------------------------------------------------------------------------------------
# Property tests: random streams of batches, with the ledger's invariants checked after
# each, and each command's code checked against a small independent model of the rules.

SCOPES = ("a", "b")
CURRENCIES = (EUR, USD)
small_amounts = st.integers(1, 400)
big_amounts = st.integers(2**60, INT64_MAX)  # a few of these reach the overflow checks
amounts = st.one_of(*[small_amounts] * 6, big_amounts)
# Round timeouts and clock steps often meet a hold's expires_at exactly.
timeouts = st.one_of(st.none(), st.sampled_from([30, 60, 90]), st.integers(1, 120))
clock_steps = st.one_of(st.sampled_from([30, 60]), st.integers(1, 150))


@dataclasses.dataclass
class _Shadow:
    """What the model expects: account totals and hold states, applied command by command."""

    totals: dict[int, list[int]]  # id -> [debits posted, credits posted, debits/credits pending]
    status: dict[int, TransferStatus]


def _one_in(data: st.DataObject, n: int) -> bool:
    return data.draw(st.integers(0, n - 1)) == 0


class LedgerMachine(RuleBasedStateMachine):
    """Random streams of batches through `Ledger`, with every result predicted by `_expected`
    and the ledger's invariants checked after every batch.

    Commands accumulate in `self.batch` and go through apply_batch together on `flush`;
    `advance` moves the clock, so holds time out and the sweeper's expiries succeed.
    Draws mostly make commands that can succeed (visible accounts of one currency), and
    sometimes ones that cannot, so that every failure code turns up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.batch: list[Command] = []
        self.resolved: Counter[int] = Counter()
        self.currencies: tuple[str, ...] = (EUR,)

    # -- drawing -----------------------------------------------------------------------------

    def _caller(self, data: st.DataObject) -> str | None:
        return data.draw(st.sampled_from([None, None, *SCOPES]))

    def _spec(self, data: st.DataObject, scope: str | None) -> TransferSpec:
        accounts = self.ledger.accounts
        everyone = sorted(accounts)
        visible = [i for i in everyone if scope is None or accounts[i].scope == scope]
        if _one_in(data, 25) or not visible:
            debit = UNKNOWN_ID
        elif _one_in(data, 15):
            debit = data.draw(st.sampled_from(everyone))  # perhaps someone else's
        else:
            debit = data.draw(st.sampled_from(visible))
        currency = accounts[debit].currency if debit in accounts else EUR
        peers = [i for i in visible if i != debit and accounts[i].currency == currency]
        if _one_in(data, 25):
            credit = UNKNOWN_ID
        elif _one_in(data, 25):
            credit = debit
        elif _one_in(data, 15) or not peers:
            credit = data.draw(st.sampled_from(everyone))
        else:
            credit = data.draw(st.sampled_from(peers))
        if _one_in(data, 20):
            currency = data.draw(st.sampled_from(CURRENCIES))
        pending = data.draw(st.booleans())
        return TransferSpec(
            debit_account_id=debit,
            credit_account_id=credit,
            amount_minor=data.draw(amounts),
            currency=currency,
            pending=pending,
            timeout_s=data.draw(timeouts) if pending else None,
        )

    def _hold(self, data: st.DataObject, *, due: bool = False) -> int:
        """A transfer to resolve: mostly an open hold (one past its timeout if `due`)."""
        transfers = self.ledger.transfers
        everyone = sorted(transfers)
        open_holds = [i for i in everyone if transfers[i].status is TransferStatus.PENDING]
        if due and not _one_in(data, 4):
            now = self.ledger.now
            due_holds = [i for i in open_holds if (transfers[i].expires_at or now) < now]
            open_holds = due_holds or open_holds
        if _one_in(data, 25) or not everyone:
            return UNKNOWN_ID
        if _one_in(data, 6) or not open_holds:
            return data.draw(st.sampled_from(everyone))
        return data.draw(st.sampled_from(open_holds))

    def _scope_for(self, data: st.DataObject, transfer_id: int) -> str | None:
        transfer = self.ledger.transfers.get(transfer_id)
        if transfer is None or _one_in(data, 8):
            return data.draw(st.sampled_from([None, *SCOPES]))
        return data.draw(st.sampled_from([None, transfer.scope or None]))

    # -- rules -------------------------------------------------------------------------------

    @initialize(
        kinds=st.lists(
            st.tuples(
                st.sampled_from([USER, MERCHANT]),
                st.sampled_from(CURRENCIES),
                st.sampled_from(SCOPES),
            ),
            min_size=2,
            max_size=6,
        ),
        currencies=st.sampled_from([(EUR,), (EUR, USD)]),
    )
    def open_accounts(
        self,
        kinds: list[tuple[AccountKind, str, str]],
        currencies: tuple[str, ...],
    ) -> None:
        self.currencies = currencies
        self.batch = [CreateAccount(currency=c, kind=SYSTEM) for c in currencies]
        self.batch += [
            CreateAccount(currency=c if c in currencies else EUR, kind=k, scope=s)
            for k, c, s in kinds
        ]
        self._apply()

    @precondition(lambda self: len(self.ledger.accounts) < 12)
    @rule(
        kind=st.sampled_from(list(AccountKind)),
        currency=st.sampled_from(CURRENCIES),
        scope=st.sampled_from([None, *SCOPES]),
    )
    def create_account(self, kind: AccountKind, currency: str, scope: str | None) -> None:
        if currency not in self.currencies:
            currency = EUR
        self.batch.append(CreateAccount(currency=currency, kind=kind, scope=scope))

    @rule(data=st.data())
    def fund(self, data: st.DataObject) -> None:
        """Money in from a system account, so that users and merchants can spend."""
        accounts = self.ledger.accounts
        credit = data.draw(st.sampled_from(sorted(accounts)))
        systems = [
            i
            for i, a in sorted(accounts.items())
            if a.kind is SYSTEM and a.currency == accounts[credit].currency and i != credit
        ]
        if not systems:
            return
        spec = TransferSpec(
            debit_account_id=data.draw(st.sampled_from(systems)),
            credit_account_id=credit,
            amount_minor=data.draw(st.one_of(st.integers(1, 2_000), big_amounts)),
            currency=accounts[credit].currency,
            pending=_one_in(data, 4),
        )
        self.batch.append(CreateTransfers(transfers=(spec,)))

    @rule(data=st.data())
    def transfer(self, data: st.DataObject) -> None:
        scope = self._caller(data)
        self.batch.append(CreateTransfers(transfers=(self._spec(data, scope),), scope=scope))

    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        """A hold that can succeed: from a system account or one with money to spare."""
        accounts = self.ledger.accounts
        debits = [i for i, a in sorted(accounts.items()) if a.overdraft_allowed or a.posted > 0]
        debit = data.draw(st.sampled_from(debits))
        account = accounts[debit]
        peers = [
            i for i, a in sorted(accounts.items()) if i != debit and a.currency == account.currency
        ]
        if not peers:
            return
        spare = account.credits_posted - account.debits_posted - account.debits_pending
        limit = 2_000 if account.overdraft_allowed else max(1, spare)
        spec = TransferSpec(
            debit_account_id=debit,
            credit_account_id=data.draw(st.sampled_from(peers)),
            amount_minor=data.draw(st.integers(1, limit)),
            currency=account.currency,
            pending=True,
            timeout_s=data.draw(timeouts),
        )
        self.batch.append(CreateTransfers(transfers=(spec,)))

    @rule(data=st.data(), size=st.integers(1, 4))
    def linked(self, data: st.DataObject, size: int) -> None:
        scope = self._caller(data)
        specs = tuple(self._spec(data, scope) for _ in range(size))
        self.batch.append(CreateTransfers(transfers=specs, linked=True, scope=scope))

    @precondition(lambda self: bool(self.ledger.transfers))
    @rule(data=st.data())
    def post(self, data: st.DataObject) -> None:
        transfer_id = self._hold(data)
        amount = None
        if transfer_id in self.ledger.transfers and data.draw(st.booleans()):
            full = self.ledger.transfers[transfer_id].amount_minor
            over = min(full + 1, INT64_MAX)
            amount = data.draw(st.one_of(st.integers(1, full), st.sampled_from([full, over])))
        scope = self._scope_for(data, transfer_id)
        self.batch.append(PostPending(transfer_id=transfer_id, amount_minor=amount, scope=scope))

    @precondition(lambda self: bool(self.ledger.transfers))
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        transfer_id = self._hold(data)
        scope = self._scope_for(data, transfer_id)
        self.batch.append(VoidPending(transfer_id=transfer_id, scope=scope))

    @precondition(lambda self: bool(self.ledger.transfers))
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        """The sweeper: an operator command, mostly for a hold past its timeout."""
        transfer_id = self._hold(data, due=True)
        self.batch.append(VoidPending(transfer_id=transfer_id, expired=True))

    @rule(seconds=clock_steps)
    def advance(self, seconds: int) -> None:
        self.ledger.now += timedelta(seconds=seconds)

    @precondition(lambda self: bool(self.batch))
    @rule(size=st.integers(1, 8))
    def flush(self, size: int) -> None:
        if len(self.batch) >= size:
            self._apply()

    def teardown(self) -> None:
        if self.batch:
            self._apply()

    def _apply(self) -> None:
        commands, self.batch = self.batch, []
        expected = self._expected(commands)
        before = {i: dataclasses.replace(a) for i, a in self.ledger.accounts.items()}
        transfers = self.ledger.transfers
        open_holds = {i for i, t in transfers.items() if t.status is TransferStatus.PENDING}
        plan = self.ledger.run(*commands)
        assert {u.id for u in plan.hold_updates} <= open_holds, "a hold resolved twice"
        assert len(plan.results) == len(commands)
        for command, result, (code, index) in zip(commands, plan.results, expected, strict=True):
            assert (result.code, result.failed_index) == (code, index), (command, result)
            self._check_result(command, result)
        self._check_plan(plan, before)
        self._check_ledger()

    # -- the model -------------------------------------------------------------------------

    def _expected(self, commands: Sequence[Command]) -> list[tuple[ResultCode, int | None]]:
        """Each command's code (and failed index), decided by a model of the rules."""
        ledger = self.ledger
        shadow = _Shadow(
            totals={i: list(ledger.totals(i)) for i in ledger.accounts},
            status={i: t.status for i, t in ledger.transfers.items()},
        )
        expected: list[tuple[ResultCode, int | None]] = []
        for command in commands:
            if isinstance(command, CreateAccount):
                expected.append((OK, None))  # not visible to the rest of the batch
            elif isinstance(command, CreateTransfers):
                expected.append(self._expected_transfers(shadow, command))
            else:
                expected.append((self._expected_resolution(shadow, command), None))
        return expected

    def _expected_transfers(
        self, shadow: _Shadow, command: CreateTransfers
    ) -> tuple[ResultCode, int | None]:
        staged = {i: list(t) for i, t in shadow.totals.items()}
        accounts = self.ledger.accounts

        def visible(i: int) -> bool:
            return i in accounts and command.scope in (None, accounts[i].scope)

        for index, spec in enumerate(command.transfers):
            d, c, amount = spec.debit_account_id, spec.credit_account_id, spec.amount_minor
            if d == c:
                return ResultCode.ACCOUNTS_MUST_DIFFER, index
            if not visible(d) or not visible(c):
                return ResultCode.ACCOUNT_NOT_FOUND, index
            if not accounts[d].currency == accounts[c].currency == spec.currency:
                return ResultCode.CURRENCY_MISMATCH, index
            dp, cp, dpe, _ = staged[d]
            if dp + dpe + amount > INT64_MAX or sum(staged[c][1::2]) + amount > INT64_MAX:
                return ResultCode.OVERFLOW, index
            if not accounts[d].overdraft_allowed and amount > cp - dp - dpe:
                return ResultCode.INSUFFICIENT_FUNDS, index
            staged[d][2 if spec.pending else 0] += amount
            staged[c][3 if spec.pending else 1] += amount
        shadow.totals = staged
        return OK, None

    def _expected_resolution(
        self, shadow: _Shadow, command: PostPending | VoidPending
    ) -> ResultCode:
        transfer = self.ledger.transfers.get(command.transfer_id)
        if transfer is None or command.scope not in (None, transfer.scope):
            return ResultCode.TRANSFER_NOT_FOUND
        if not transfer.pending:
            return ResultCode.TRANSFER_NOT_PENDING
        if shadow.status[transfer.id] is TransferStatus.EXPIRED:
            return ResultCode.PENDING_TRANSFER_EXPIRED
        if shadow.status[transfer.id] is not TransferStatus.PENDING:
            return ResultCode.TRANSFER_ALREADY_RESOLVED
        now = self.ledger.now
        expired = transfer.expires_at is not None and now >= transfer.expires_at
        sweeping = isinstance(command, VoidPending) and command.expired
        if expired != sweeping:
            return (
                ResultCode.PENDING_TRANSFER_EXPIRED if expired else ResultCode.TRANSFER_NOT_PENDING
            )
        amount = transfer.amount_minor
        posted = 0
        if isinstance(command, PostPending):
            posted = amount if command.amount_minor is None else command.amount_minor
            if posted > amount:
                return ResultCode.POST_AMOUNT_EXCEEDS_PENDING
            shadow.status[transfer.id] = TransferStatus.POSTED
        else:
            shadow.status[transfer.id] = (
                TransferStatus.EXPIRED if command.expired else TransferStatus.VOIDED
            )
        debit, credit = (
            shadow.totals[transfer.debit_account_id],
            shadow.totals[transfer.credit_account_id],
        )
        debit[2] -= amount
        credit[3] -= amount
        debit[0] += posted
        credit[1] += posted
        return OK

    # -- checks ----------------------------------------------------------------------------

    def _check_result(self, command: Command, result: Result) -> None:
        if not result.ok:
            assert result.transfers == () and result.account is None
            return
        if isinstance(command, CreateTransfers):
            assert len(result.transfers) == len(command.transfers)
            group_ids = {t.group_id for t in result.transfers}
            assert len(group_ids) == 1
            assert (group_ids != {None}) is command.linked
            for view, spec in zip(result.transfers, command.transfers, strict=True):
                assert (view.debit_account_id, view.credit_account_id) == (
                    spec.debit_account_id,
                    spec.credit_account_id,
                )
                assert (view.amount_minor, view.pending) == (spec.amount_minor, spec.pending)
                timeout = spec.timeout_s if spec.pending else None
                assert view.expires_at == (
                    None if timeout is None else self.ledger.now + timedelta(seconds=timeout)
                )
        elif isinstance(command, PostPending | VoidPending):
            [view] = result.transfers
            assert view.id == command.transfer_id and view.resolved_at == self.ledger.now
            self.resolved[view.id] += 1
            assert self.resolved[view.id] == 1, "a hold was resolved twice"
            expected_status = (
                TransferStatus.POSTED
                if isinstance(command, PostPending)
                else TransferStatus.EXPIRED
                if command.expired
                else TransferStatus.VOIDED
            )
            assert view.status is expected_status
            assert self.ledger.transfers[view.id].status is expected_status

    def _check_plan(self, plan: BatchPlan, before: dict[int, AccountState]) -> None:
        ok = [r for r in plan.results if r.ok]
        created = [t for r in ok for t in r.transfers if t.resolved_at is None]
        assert [t for t, _ in plan.transfers_created] == created
        assert len(plan.hold_updates) == sum(
            1 for r in ok for t in r.transfers if t.resolved_at is not None
        )
        assert len(plan.entries) == 2 * (len(plan.transfers_created) + len(plan.hold_updates))
        assert len(plan.accounts_created) == sum(1 for r in ok if r.account is not None)
        # Entries carry the running balances of their account.
        running = {i: (a.posted, a.pending) for i, a in before.items()}
        for entry in plan.entries:
            posted, pending = running[entry.account_id]
            posted += entry.posted_delta_minor
            pending += entry.pending_delta_minor
            assert (entry.posted_after_minor, entry.pending_after_minor) == (posted, pending)
            running[entry.account_id] = (posted, pending)
        touched = {e.account_id for e in plan.entries}
        assert set(plan.accounts_changed) == touched
        for i in touched:
            changed = plan.accounts_changed[i]
            assert (changed.posted, changed.pending) == running[i]

    def _check_ledger(self) -> None:
        ledger = self.ledger
        posted_sum: Counter[str] = Counter()
        pending_sum: Counter[str] = Counter()
        open_out: Counter[int] = Counter()
        open_in: Counter[int] = Counter()
        moved_out: Counter[int] = Counter()
        moved_in: Counter[int] = Counter()
        for t in ledger.transfers.values():
            if t.status is TransferStatus.PENDING:
                open_out[t.debit_account_id] += t.amount_minor
                open_in[t.credit_account_id] += t.amount_minor
            moved_out[t.debit_account_id] += ledger.posted_amount[t.id]
            moved_in[t.credit_account_id] += ledger.posted_amount[t.id]
        for i, a in ledger.accounts.items():
            posted_sum[a.currency] += a.posted
            pending_sum[a.currency] += a.pending
            assert a.overdraft_allowed is (a.kind is SYSTEM)
            if not a.overdraft_allowed:
                assert a.debits_posted + a.debits_pending <= a.credits_posted, a
            entries = ledger.entries[i]
            assert a.posted == sum(e.posted_delta_minor for e in entries)
            assert a.pending == sum(e.pending_delta_minor for e in entries)
            if entries:
                last = entries[-1]
                assert (last.posted_after_minor, last.pending_after_minor) == (a.posted, a.pending)
            assert (a.debits_pending, a.credits_pending) == (open_out[i], open_in[i])
            assert (a.debits_posted, a.credits_posted) == (moved_out[i], moved_in[i])
        assert all(v == 0 for v in posted_sum.values()), posted_sum
        assert all(v == 0 for v in pending_sum.values()), pending_sum
        for transfer_id, count in self.resolved.items():
            assert count == 1
            assert ledger.transfers[transfer_id].status is not TransferStatus.PENDING


LedgerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerMachine = LedgerMachine.TestCase
