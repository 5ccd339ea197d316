"""Locust scenarios partners run against txengine; each checks its answers' bodies.

    # as a partner (every /v1 request is signed): `txengine partners create` prints both
    export PARTNER_ID=acme-shop PARTNER_SECRET=sk_...
    # headless, one process, against a server on :8080
    .venv/bin/locust -f bench/locustfile.py --headless -H http://127.0.0.1:8080 \\
        -u 200 -r 50 -t 2m
    # distributed: one master, N workers (on this machine or others that reach the server)
    .venv/bin/locust -f bench/locustfile.py --headless --master --expect-workers 4 \\
        -H http://127.0.0.1:8080 -u 2000 -r 200 -t 5m
    .venv/bin/locust -f bench/locustfile.py --worker --master-host 127.0.0.1   # x4

Pick scenarios by class name (`locust -f bench/locustfile.py P2PUser EscrowUser`); each
has a weight for mixed runs. Every user opens its own wallet and has it funded by a bank
(system) account of its process; the hot merchant (and the café, the shop) is one per
process, or the account in TXENGINE_LOCUST_MERCHANT_ID (..._CAFE_ID, ..._SHOP_ID) for one
across all workers.

Every request is signed as the partner PARTNER_ID with its HMAC secret PARTNER_SECRET
(gateway/signing.py), the Idempotency-Key included; a retry with the same key is signed
anew (a fresh nonce), as a partner's client would.

Adding a product's scenario is one class: subclass `LedgerUser`, give it a `weight` and
`@task` methods that call `self.post(...)` / `self.get(...)` with a `check` of the
answer's body, as the classes below do.
"""

from __future__ import annotations

import functools
import json
import os
import random
import threading
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from locust import FastHttpUser, between, task
from locust.exception import RescheduleTask

from gateway.signing import Signer

CURRENCY = "CNY"
FUNDING_MINOR = 10_000_000
AMOUNT_MINOR_MAX = 500

Check = Callable[[dict[str, Any]], str | None]  # None if the body is right, else why not


@functools.cache
def signer() -> Signer:
    """The partner every request is signed as, from PARTNER_ID and PARTNER_SECRET."""
    partner_id, secret = os.environ.get("PARTNER_ID"), os.environ.get("PARTNER_SECRET")
    if not partner_id or not secret:
        raise RuntimeError("set PARTNER_ID and PARTNER_SECRET: every /v1 request is signed")
    return Signer.hmac(partner_id, secret)


def signed_headers(method: str, path: str, body: bytes, *, key: str = "") -> dict[str, str]:
    """The headers of one request: its signature (over the key too), key and type."""
    headers = signer().headers(method, path, body, idempotency_key=key)
    if key:
        headers["Idempotency-Key"] = key
    if body:
        headers["Content-Type"] = "application/json"
    return headers


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


def _judge(response: Any, *, status: int, check: Check | None) -> tuple[dict[str, Any], str | None]:
    """Pass or fail a request by its status and `check` of its body: its body, and why
    it failed (None if it passed). Called inside the catch_response block."""
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
    return doc, problem


def _passed(judged: tuple[dict[str, Any], str | None]) -> dict[str, Any]:
    """The body of a passed request; after a failure (recorded by `_judge`), the steps
    that depend on this answer are skipped."""
    doc, problem = judged
    if problem is not None:
        raise RescheduleTask(problem)
    return doc


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
        """POST, signed, with a fresh Idempotency-Key (or `key`); fail the request unless
        status and check hold."""
        data = json.dumps(body).encode()
        headers = signed_headers("POST", path, data, key=key or uuid.uuid4().hex)
        with self.client.post(
            path, data=data, headers=headers, name=name or path, catch_response=True
        ) as response:
            judged = _judge(response, status=status, check=check)
        return _passed(judged)

    def get(self, path: str, *, name: str, check: Check | None = None) -> dict[str, Any]:
        headers = signed_headers("GET", path, b"")
        with self.client.get(path, headers=headers, name=name, catch_response=True) as response:
            judged = _judge(response, status=200, check=check)
        return _passed(judged)

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
            name="/v1/transfers (funding)",
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


def _out_no() -> str:
    """A partner's own number for an order or trade: unique, letters and digits."""
    return uuid.uuid4().hex


def _is_id(*names: str) -> Check:
    """Each of these fields is an id: a decimal string."""

    def check(body: dict[str, Any]) -> str | None:
        wrong = [n for n in names if not str(body.get(n, "")).isdigit()]
        return f"not decimal-string ids: {[(n, body.get(n)) for n in wrong]}" if wrong else None

    return check


def _all(*checks: Check) -> Check:
    def check(body: dict[str, Any]) -> str | None:
        return next((p for c in checks if (p := c(body)) is not None), None)

    return check


def _problem(code: str, **fields: Any) -> Check:
    """An RFC 9457 problem with this code (and these extensions)."""
    return expect(type=f"/problems/{code}", code=code, **fields)


class QRPaymentUser(LedgerUser):
    """A café's till precreates an order, the customer's app pays it by its QR code; the
    payment is checked down to the transfer that moved the money. Now and then the same
    code is paid again, which must be refused."""

    weight = 2

    def on_start(self) -> None:
        self.wallet = self.funded_wallet()
        self.cafe = self.shared_account("cafe", "merchant")

    def _precreate(self, amount: int) -> dict[str, Any]:
        return self.post(
            "/v1/orders",
            {
                "merchant_account_id": self.cafe,
                "out_trade_no": _out_no(),
                "subject": "Iced latte",
                "amount_minor": amount,
                "currency": CURRENCY,
                "timeout_express": "15m",
            },
            check=_all(
                expect(
                    object="order",
                    merchant_account_id=self.cafe,
                    amount_minor=amount,
                    currency=CURRENCY,
                    source="qr_code",
                    state="WAIT_BUYER_PAY",
                    payer_account_id=None,
                    transfer_id=None,
                ),
                _is_id("id"),
                lambda doc: (
                    None
                    if str(doc.get("qr_code", "")).startswith("txengine://pay/")
                    else f"qr_code {doc.get('qr_code')!r}"
                ),
            ),
            name="/v1/orders (precreate)",
        )

    def _pay(self, order: dict[str, Any]) -> dict[str, Any]:
        amount = order["amount_minor"]

        def fee_within(doc: dict[str, Any]) -> str | None:
            fee = doc.get("fee_minor")
            ok = isinstance(fee, int) and 0 <= fee <= amount
            return None if ok else f"fee_minor {fee!r} for {amount}"

        return self.post(
            "/v1/orders/pay",
            {"qr_code": order["qr_code"], "payer_account_id": self.wallet},
            status=200,
            check=_all(
                expect(
                    object="order",
                    id=order["id"],
                    state="TRADE_SUCCESS",
                    payer_account_id=self.wallet,
                    amount_minor=amount,
                    currency=CURRENCY,
                    refunded_minor=0,
                ),
                _is_id("transfer_id"),
                fee_within,
            ),
            name="/v1/orders/pay",
        )

    @task(5)
    def scan_and_pay(self) -> None:
        amount = random.randint(1, AMOUNT_MINOR_MAX)
        paid = self._pay(self._precreate(amount))
        # The money moved: the whole amount from the wallet to the café, posted.
        self.get(
            f"/v1/transfers/{paid['transfer_id']}",
            name="/v1/transfers/{id} (order payment)",
            check=is_transfer(self.wallet, self.cafe, amount, "posted"),
        )

    @task(1)
    def pay_twice_is_refused(self) -> None:
        order = self._precreate(random.randint(1, AMOUNT_MINOR_MAX))
        self._pay(order)
        self.post(
            "/v1/orders/pay",
            {"qr_code": order["qr_code"], "payer_account_id": self.wallet},
            status=409,
            check=_problem("order_state_conflict", state="TRADE_SUCCESS"),
            name="/v1/orders/pay (again)",
        )


class EscrowUser(LedgerUser):
    """An escrow trade from pay to confirm: the buyer's money held, the shop ships, the
    buyer confirms and the hold is posted to the shop."""

    weight = 1

    def on_start(self) -> None:
        self.wallet = self.funded_wallet()
        self.shop = self.shared_account("shop", "merchant")

    def _step(self, trade_id: str, action: str, check: Check) -> dict[str, Any]:
        return self.post(
            f"/v1/trades/{trade_id}/{action}",
            {},
            status=200,
            check=_all(expect(object="trade", id=trade_id), check),
            name=f"/v1/trades/{{id}}/{action}",
        )

    @task
    def pay_ship_confirm(self) -> None:
        amount = random.randint(1, AMOUNT_MINOR_MAX)
        parties = {"seller_account_id": self.shop, "buyer_account_id": self.wallet}
        trade = self.post(
            "/v1/trades",
            {
                "out_trade_no": _out_no(),
                **parties,
                "amount_minor": amount,
                "currency": CURRENCY,
                "subject": "A Yixing teapot",
                "timeout_express": "30m",
            },
            check=_all(
                expect(
                    object="trade",
                    state="WAIT_BUYER_PAY",
                    amount_minor=amount,
                    currency=CURRENCY,
                    held_minor=0,
                    settled_minor=0,
                    **parties,
                ),
                _is_id("id"),
            ),
            name="/v1/trades",
        )
        trade_id = trade["id"]
        paid = self._step(
            trade_id,
            "pay",
            _all(
                expect(state="WAIT_SELLER_SEND_GOODS", held_minor=amount, settled_minor=0),
                _is_id("hold_transfer_id"),
            ),
        )
        hold = paid["hold_transfer_id"]
        self.get(
            f"/v1/transfers/{hold}",
            name="/v1/transfers/{id} (trade hold)",
            check=is_transfer(self.wallet, self.shop, amount, "pending"),
        )
        self._step(
            trade_id,
            "ship",
            expect(state="WAIT_BUYER_CONFIRM_GOODS", held_minor=amount, hold_transfer_id=hold),
        )

        def settled(doc: dict[str, Any]) -> str | None:
            fee = doc.get("fee_minor")
            ok = isinstance(fee, int) and 0 <= fee <= amount
            return None if ok else f"fee_minor {fee!r} for {amount}"

        self._step(
            trade_id,
            "confirm",
            _all(
                expect(
                    state="TRADE_SUCCESS",
                    held_minor=0,
                    settled_minor=amount,
                    confirmed_by="buyer",
                    refunded_minor=0,
                ),
                settled,
            ),
        )
        # The hold was posted in full to the shop (its fee, if any, moves on its own).
        self.get(
            f"/v1/transfers/{hold}",
            name="/v1/transfers/{id} (trade hold)",
            check=is_transfer(self.wallet, self.shop, amount, "posted", posted=amount),
        )


# What a wallet that got one top-up holds, (credits pending, credits posted) in units of
# the amount, for each state of the top-up: its hold open, posted, or voided.
_TOPUP_CREDITS = {
    "pending": (1, 0),
    "succeeded": (0, 1),
    "failed": (0, 0),
    "timed_out": (0, 0),
}


class TopupUser(LedgerUser):
    """Cash top-ups through a bank channel, each into a new wallet: a pending credit (a
    hold from the channel's clearing account, a house account, to the wallet) until the
    bank calls back. Whether a bank simulator answers or not, the top-up's state and the
    wallet's balance must agree."""

    weight = 1
    channel = os.environ.get("TXENGINE_LOCUST_CHANNEL", "cash")

    @task
    def top_up(self) -> None:
        wallet = self.open_account("user")
        amount = random.randint(100, 10_000)
        topup = self.post(
            "/v1/topups",
            {"account_id": wallet, "amount_minor": amount, "currency": CURRENCY}
            | {"channel": self.channel},
            check=_all(
                expect(
                    object="topup",
                    channel=self.channel,
                    account_id=wallet,
                    amount_minor=amount,
                    currency=CURRENCY,
                    state="pending",  # the bank is asked only after this was committed
                ),
                _is_id("id", "hold_id"),
            ),
            name="/v1/topups",
        )

        def known(doc: dict[str, Any]) -> str | None:
            if doc.get("state") not in _TOPUP_CREDITS:
                return f"unknown state {doc.get('state')!r}"
            return expect(id=topup["id"], hold_id=topup["hold_id"], amount_minor=amount)(doc)

        state = self.get(f"/v1/topups/{topup['id']}", name="/v1/topups/{id}", check=known)["state"]
        # Read after the top-up: if it was pending then, the bank may have answered since.
        allowed = {_TOPUP_CREDITS[state]} if state != "pending" else set(_TOPUP_CREDITS.values())

        def the_hold(doc: dict[str, Any]) -> str | None:
            credits = (doc.get("credits_pending_minor"), doc.get("credits_posted_minor"))
            if credits not in {(p * amount, c * amount) for p, c in allowed}:
                return f"credits (pending, posted) {credits} of {amount} with the top-up {state}"
            return None

        self.get(f"/v1/accounts/{wallet}", name="/v1/accounts/{id} (top-up)", check=the_hold)
