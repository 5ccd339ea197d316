-- QR-code merchant payments (扫码支付), payment codes (付款码) and bill payments
-- (engine/products/orders.py, payment_codes.py, bills.py).

-- A merchant's order. `state` is engine.products.orders.OrderState; an unpaid order
-- carries its deadline in `expires_at`, which the timer job orders.expire sweeps.
CREATE TABLE orders (
    id                  bigint      PRIMARY KEY,
    scope               text        NOT NULL,  -- the partner that created it
    merchant_account_id bigint      NOT NULL REFERENCES accounts (id),
    out_trade_no        text        NOT NULL CHECK (out_trade_no ~ '^[A-Za-z0-9_]{1,64}$'),
    subject             text        NOT NULL CHECK (length(subject) BETWEEN 1 AND 256),
    amount_minor        bigint      NOT NULL CHECK (amount_minor > 0),
    currency            char(3)     NOT NULL,
    source              text        NOT NULL CHECK (source IN ('qr_code', 'payment_code')),
    -- The unguessable code a QR payload carries (128 random bits, base64url); NULL for an
    -- order charged from a payment code. Not a secret kept from the payer: whoever scans
    -- the code may pay the order, which only ever credits the merchant.
    code                text        UNIQUE,
    state               text        NOT NULL
                        CHECK (state IN ('WAIT_BUYER_PAY', 'TRADE_SUCCESS', 'TRADE_CLOSED')),
    close_reason        text        CHECK (close_reason IN ('closed', 'expired', 'refunded')),
    payer_account_id    bigint      REFERENCES accounts (id),
    transfer_id         bigint,     -- the payer → merchant transfer, once paid
    fee_minor           bigint      NOT NULL DEFAULT 0 CHECK (fee_minor >= 0),
    refunded_minor      bigint      NOT NULL DEFAULT 0
                        CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    notify_url          text,
    expires_at          timestamptz NOT NULL,
    created_at          timestamptz NOT NULL,
    paid_at             timestamptz,
    closed_at           timestamptz,
    UNIQUE (scope, merchant_account_id, out_trade_no),
    CHECK ((state = 'TRADE_CLOSED') = (close_reason IS NOT NULL)),
    CHECK ((paid_at IS NULL) = (transfer_id IS NULL))
);
-- The expiry timer's work list: only unpaid orders, by deadline.
CREATE INDEX orders_unpaid_by_deadline ON orders (expires_at) WHERE state = 'WAIT_BUYER_PAY';

-- Refunds of a paid order, each keyed by the merchant's out_request_no.
CREATE TABLE order_refunds (
    order_id       bigint      NOT NULL REFERENCES orders (id),
    out_request_no text        NOT NULL CHECK (out_request_no ~ '^[A-Za-z0-9_]{1,64}$'),
    id             bigint      NOT NULL UNIQUE,
    amount_minor   bigint      NOT NULL CHECK (amount_minor > 0),
    transfer_id    bigint      NOT NULL,  -- merchant → payer
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (order_id, out_request_no)
);

-- Payment codes (付款码) a payer shows at a till: short-lived, single-use, bound to one
-- payer account. Only the SHA-256 of the code is kept; the lookup is by that hash.
CREATE TABLE payment_codes (
    code_sha256      bytea       PRIMARY KEY CHECK (length(code_sha256) = 32),
    scope            text        NOT NULL,
    payer_account_id bigint      NOT NULL REFERENCES accounts (id),
    expires_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL,
    used_at          timestamptz,
    order_id         bigint      REFERENCES orders (id),
    CHECK ((used_at IS NULL) = (order_id IS NULL))
);
-- The reaper's work list (payment_codes.reap): codes long past their minute.
CREATE INDEX payment_codes_by_expiry ON payment_codes (expires_at);

-- Billers: merchant accounts that take bill payments, with the format a payer's
-- reference must have (checked before any money moves).
CREATE TABLE billers (
    id                bigint      PRIMARY KEY,
    scope             text        NOT NULL,
    account_id        bigint      NOT NULL UNIQUE REFERENCES accounts (id),
    name              text        NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    biller_type       text        NOT NULL
                      CHECK (biller_type IN ('utility', 'mobile_topup', 'credit_card')),
    reference_pattern text        NOT NULL CHECK (length(reference_pattern) BETWEEN 1 AND 256),
    luhn              boolean     NOT NULL,  -- the reference's last digit is a Luhn check
    created_at        timestamptz NOT NULL
);

-- Bill payments and the receipts they answered with.
CREATE TABLE bill_payments (
    id               bigint      PRIMARY KEY,
    scope            text        NOT NULL,
    receipt_no       text        NOT NULL UNIQUE,
    biller_id        bigint      NOT NULL REFERENCES billers (id),
    payer_account_id bigint      NOT NULL REFERENCES accounts (id),
    reference        text        NOT NULL,
    amount_minor     bigint      NOT NULL CHECK (amount_minor > 0),
    fee_minor        bigint      NOT NULL CHECK (fee_minor >= 0),
    currency         char(3)     NOT NULL,
    transfer_id      bigint      NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX bill_payments_by_biller ON bill_payments (biller_id, id);
