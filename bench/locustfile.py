"""Locust scenarios partners run against txengine; each checks its answers' bodies.

    # headless, one process, against a server on :8080
    .venv/bin/locust -f bench/locustfile.py --headless -H http://127.0.0.1:8080 \\
        -u 200 -r 50 -t 2m
    # distributed: one master, N workers (on this machine or others that reach the server)
    .venv/bin/locust -f bench/locustfile.py --headless --master --expect-workers 4 \\
        -H http://127.0.0.1:8080 -u 2000 -r 200 -t 5m
    .venv/bin/locust -f bench/locustfile.py --worker --master-host 127.0.0.1   # x4

Pick scenarios by class name (`locust -f bench/locustfile.py P2PUser HoldUser`); each
has a weight for mixed runs. Every user opens its own wallet and has it funded by a bank
(system) account of its process; the hot merchant is one per process, or the account in
TXENGINE_LOCUST_MERCHANT_ID for one across all workers.

Adding a product's scenario (QR payments, escrow trades, top-ups) is one class: subclass
`LedgerUser`, give it a `weight` and `@task` methods that call `self.post(...)` with a
`check` of the answer's body, as the classes below do.
"""

from __future__ import annotations

import os
import random
import threading
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from locust import FastHttpUser, between, task
from locust.exception import RescheduleTask

CURRENCY = "CNY"
FUNDING_MINOR = 10_000_000
AMOUNT_MINOR_MAX = 500

Check = Callable[[dict[str, Any]], str | None]  # None if the body is right, else why not


def expect(**fields: Any) -> Check:
    """A check that the body has these exact field values."""

    def check(body: dict[str, Any]) -> str | None:
        wrong = {k: body.get(k) for k, v in fields.items() if body.get(k) != v}
        return f"expected {fields}, got {wrong}" if wrong else None

    return check


def is_transfer(
    debit: str, credit: str, amount: int, status: str, *, posted: int | None = None
) -> Check:
    """A transfer object between these accounts, in this state."""
    posted_minor = amount if posted is None and status == "posted" else posted or 0

    def check(body: dict[str, Any]) -> str | None:
        problem = expect(
            object="transfer",
            debit_account_id=debit,
            credit_account_id=credit,
            amount_minor=amount,
            currency=CURRENCY,
            status=status,
            posted_amount_minor=posted_minor,
        )(body)
        if problem is None and not str(body.get("id", "")).isdigit():
            problem = f"id {body.get('id')!r} is not a decimal string"
        return problem

    return check


class _Shared:
    """Per-process accounts every user of the process may use: the bank, the merchant."""

    lock = threading.Lock()
    accounts: ClassVar[dict[str, str]] = {}


class LedgerUser(FastHttpUser):
    """Helpers shared by every scenario: keyed POSTs with body checks, accounts."""

    abstract = True
    wait_time = between(0.0, 0.05)

    def post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        status: int = 201,
        check: Check | None = None,
        name: str | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """POST with a fresh Idempotency-Key; fail the request unless status and check hold."""
        headers = {"Idempotency-Key": key or uuid.uuid4().hex}
        with self.client.post(
            path, json=body, headers=headers, name=name or path, catch_response=True
        ) as response:
            doc = _json(response)
            problem = None
            if response.status_code != status:
                problem = f"{response.status_code}, wanted {status}: {response.text[:300]}"
            elif check is not None:
                problem = check(doc)
            if problem is None:
                response.success()
            else:
                response.failure(problem)
        if problem is not None:
            # Recorded as a failure above; the steps that depend on this answer are skipped.
            raise RescheduleTask(problem)
        return doc

    def get(self, path: str, *, name: str, check: Check | None = None) -> dict[str, Any]:
        with self.client.get(path, name=name, catch_response=True) as response:
            doc = _json(response)
            problem = None
            if response.status_code != 200:
                problem = f"{response.status_code}: {response.text[:300]}"
            elif check is not None:
                problem = check(doc)
            if problem is None:
                response.success()
            else:
                response.failure(problem)
        if problem is not None:
            raise RescheduleTask(problem)
        return doc

    def open_account(self, kind: str) -> str:
        doc = self.post(
            "/v1/accounts",
            {"currency": CURRENCY, "kind": kind},
            check=expect(object="account", kind=kind, currency=CURRENCY),
        )
        return str(doc["id"])

    def shared_account(self, role: str, kind: str) -> str:
        pinned = os.environ.get(f"TXENGINE_LOCUST_{role.upper()}_ID")
        if pinned:
            return pinned
        with _Shared.lock:
            if role not in _Shared.accounts:
                _Shared.accounts[role] = self.open_account(kind)
            return _Shared.accounts[role]

    def funded_wallet(self) -> str:
        bank = self.shared_account("bank", "system")
        wallet = self.open_account("user")
        self.post(
            "/v1/transfers",
            _transfer(bank, wallet, FUNDING_MINOR),
            check=is_transfer(bank, wallet, FUNDING_MINOR, "posted"),
            name="/v1/transfers (top-up)",
        )
        return wallet


def _json(response: Any) -> dict[str, Any]:
    try:
        doc = response.json()
    except Exception:
        return {}
    return doc if isinstance(doc, dict) else {}


def _transfer(debit: str, credit: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {
        "debit_account_id": debit,
        "credit_account_id": credit,
        "amount_minor": amount,
        "currency": CURRENCY,
        **extra,
    }


# Wallets of this process, so P2P users pay each other.
_wallets: list[str] = []


class P2PUser(LedgerUser):
    """People paying each other; now and then a retry, which must replay the first answer."""

    weight = 5

    def on_start(self) -> None:
        self.wallet = self.funded_wallet()
        _wallets.append(self.wallet)

    @task(10)
    def pay_a_friend(self) -> None:
        friend = random.choice([w for w in _wallets if w != self.wallet] or [self.wallet])
        if friend == self.wallet:
            return
        amount = random.randint(1, AMOUNT_MINOR_MAX)
        body = _transfer(self.wallet, friend, amount)
        check = is_transfer(self.wallet, friend, amount, "posted")
        self.post("/v1/transfers", body, check=check, name="/v1/transfers (p2p)")

    @task(1)
    def retry_is_replayed(self) -> None:
        friend = random.choice([w for w in _wallets if w != self.wallet] or [self.wallet])
        if friend == self.wallet:
            return
        key = uuid.uuid4().hex
        body = _transfer(self.wallet, friend, 1)
        first = self.post("/v1/transfers", body, key=key, name="/v1/transfers (p2p)")
        self.post(
            "/v1/transfers",
            body,
            key=key,
            check=expect(id=first["id"], status="posted"),
            name="/v1/transfers (retry)",
        )

    @task(1)
    def check_balance(self) -> None:
        def sane(doc: dict[str, Any]) -> str | None:
            balance = doc.get("balance", {})
            if doc.get("id") != self.wallet or balance.get("posted_minor", -1) < 0:
                return f"bad account view: {doc}"
            return None

        self.get(f"/v1/accounts/{self.wallet}", name="/v1/accounts/{id}", check=sane)


class HotMerchantUser(LedgerUser):
    """A sale day: every payment credits the same merchant account."""

    weight = 3

    def on_start(self) -> None:
        self.wallet = self.funded_wallet()
        self.merchant = self.shared_account("merchant", "merchant")

    @task
    def pay_the_merchant(self) -> None:
        amount = random.randint(1, AMOUNT_MINOR_MAX)
        self.post(
            "/v1/transfers",
            _transfer(self.wallet, self.merchant, amount),
            check=is_transfer(self.wallet, self.merchant, amount, "posted"),
            name="/v1/transfers (hot merchant)",
        )


class HoldUser(LedgerUser):
    """Authorise then capture or cancel: holds posted in full, in part, or voided."""

    weight = 2

    def on_start(self) -> None:
        self.wallet = self.funded_wallet()
        self.merchant = self.shared_account("merchant", "merchant")

    def _hold(self, amount: int) -> str:
        doc = self.post(
            "/v1/transfers",
            _transfer(self.wallet, self.merchant, amount, pending=True, timeout_s=3600),
            check=is_transfer(self.wallet, self.merchant, amount, "pending"),
            name="/v1/transfers (hold)",
        )
        return str(doc["id"])

    @task(3)
    def hold_then_post_in_full(self) -> None:
        amount = random.randint(2, AMOUNT_MINOR_MAX)
        hold = self._hold(amount)
        self.post(
            f"/v1/transfers/{hold}/post",
            {},
            status=200,
            check=is_transfer(self.wallet, self.merchant, amount, "posted", posted=amount),
            name="/v1/transfers/{id}/post",
        )

    @task(1)
    def hold_then_post_in_part(self) -> None:
        amount = random.randint(2, AMOUNT_MINOR_MAX)
        part = amount // 2
        hold = self._hold(amount)
        self.post(
            f"/v1/transfers/{hold}/post",
            {"amount_minor": part},
            status=200,
            check=is_transfer(self.wallet, self.merchant, amount, "posted", posted=part),
            name="/v1/transfers/{id}/post (part)",
        )

    @task(1)
    def hold_then_void(self) -> None:
        amount = random.randint(1, AMOUNT_MINOR_MAX)
        hold = self._hold(amount)
        self.post(
            f"/v1/transfers/{hold}/void",
            {},
            status=200,
            check=is_transfer(self.wallet, self.merchant, amount, "voided", posted=0),
            name="/v1/transfers/{id}/void",
        )
