-- Escrow trades (担保交易, engine/products/trades.py) and their refunds.
--
-- A trade's money is a hold from the buyer to the seller (hold_transfer_id) until the
-- buyer confirms, then posted to the seller less the fee. The trade's timers are its
-- deadline columns: each is due only in its own state (partial indexes below), so a
-- restart finds every one and a fired timer is never due again.

CREATE TABLE trades (
    id                  bigint      PRIMARY KEY,
    scope               text        NOT NULL,  -- the partner the trade belongs to
    out_trade_no        text        NOT NULL CHECK (out_trade_no ~ '^[A-Za-z0-9_]{1,64}$'),
    seller_account_id   bigint      NOT NULL REFERENCES accounts (id),
    buyer_account_id    bigint      NOT NULL REFERENCES accounts (id),
    currency            char(3)     NOT NULL,
    amount_minor        bigint      NOT NULL CHECK (amount_minor > 0),
    subject             text        NOT NULL CHECK (length(subject) BETWEEN 1 AND 256),
    state               text        NOT NULL CHECK (state IN (
                            'WAIT_BUYER_PAY', 'WAIT_SELLER_SEND_GOODS',
                            'WAIT_BUYER_CONFIRM_GOODS', 'TRADE_SUCCESS', 'TRADE_FINISHED',
                            'TRADE_CLOSED')),
    -- The trade's terms, fixed when it is created (Alipay's "Nm", "Nh", "Nd" format).
    timeout_express         text    NOT NULL,
    confirm_timeout_express text    NOT NULL,
    refund_window_express   text    NOT NULL,
    notify_url          text        CHECK (length(notify_url) <= 1024),
    -- Money: the open hold (0 once settled or released), what was posted to the seller
    -- at success, what went back to the buyer, and the fee taken and given back.
    hold_transfer_id    bigint,
    held_minor          bigint      NOT NULL DEFAULT 0 CHECK (held_minor >= 0),
    settled_minor       bigint      NOT NULL DEFAULT 0 CHECK (settled_minor >= 0),
    refunded_minor      bigint      NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    fee_minor           bigint      NOT NULL DEFAULT 0 CHECK (fee_minor >= 0),
    fee_refunded_minor  bigint      NOT NULL DEFAULT 0 CHECK (fee_refunded_minor >= 0),
    confirmed_by        text        CHECK (confirmed_by IN ('buyer', 'timer')),
    close_reason        text        CHECK (close_reason IN (
                            'pay_timeout', 'seller_closed', 'fully_refunded')),
    created_at          timestamptz NOT NULL,
    pay_expires_at      timestamptz NOT NULL,  -- unpaid by then: closed (timer)
    paid_at             timestamptz,
    shipped_at          timestamptz,
    confirm_expires_at  timestamptz,           -- unconfirmed by then: confirmed (timer)
    succeeded_at        timestamptz,
    finish_at           timestamptz,           -- the refund window closes (timer)
    finished_at         timestamptz,
    closed_at           timestamptz,
    UNIQUE (scope, seller_account_id, out_trade_no),
    CHECK (seller_account_id <> buyer_account_id),
    CHECK (refunded_minor <= amount_minor),
    CHECK (held_minor + settled_minor <= amount_minor),
    CHECK (fee_refunded_minor <= fee_minor AND fee_minor <= settled_minor)
);

CREATE INDEX trades_unpaid_by_deadline ON trades (pay_expires_at)
    WHERE state = 'WAIT_BUYER_PAY';
CREATE INDEX trades_shipped_by_deadline ON trades (confirm_expires_at)
    WHERE state = 'WAIT_BUYER_CONFIRM_GOODS';
CREATE INDEX trades_succeeded_by_deadline ON trades (finish_at)
    WHERE state = 'TRADE_SUCCESS';

-- One row per refund that moved money; a refused refund leaves only its key's record.
CREATE TABLE trade_refunds (
    id                 bigint      PRIMARY KEY,
    trade_id           bigint      NOT NULL REFERENCES trades (id),
    out_request_no     text        NOT NULL CHECK (out_request_no ~ '^[A-Za-z0-9_]{1,64}$'),
    amount_minor       bigint      NOT NULL CHECK (amount_minor > 0),
    fee_refunded_minor bigint      NOT NULL CHECK (fee_refunded_minor >= 0),
    -- false: released from the hold before settlement; true: paid back by the seller.
    after_settlement   boolean     NOT NULL,
    -- The ledger transfer that gave the money back: the seller's transfer to the buyer
    -- after settlement; before it, the voided hold.
    transfer_id        bigint      NOT NULL,
    reason             text        NOT NULL CHECK (length(reason) <= 256),
    created_at         timestamptz NOT NULL,
    UNIQUE (trade_id, out_request_no)
);
