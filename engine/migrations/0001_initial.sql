-- txengine ledger schema, version 1.
--
-- Balances follow TigerBeetle's model: each account keeps four monotonic-by-kind
-- totals, and every balance a reader sees is derived from them. Sums are credit-normal:
-- balance = credits - debits, so per currency the balances of all accounts sum to zero.

CREATE TABLE accounts (
    id                bigint PRIMARY KEY,
    currency          char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    kind              text        NOT NULL CHECK (kind IN ('user', 'merchant', 'system')),
    -- Debits may never exceed credits (posted + pending holds) unless the account may go
    -- negative (system accounts such as bank clearing).
    overdraft_allowed boolean     NOT NULL,
    debits_posted     bigint      NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted    bigint      NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending    bigint      NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending   bigint      NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    scope             text        NOT NULL,
    metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL,
    -- The database checks the same rule the engine enforces, as a last line of defence.
    CHECK (overdraft_allowed OR debits_posted + debits_pending <= credits_posted)
);

-- One row per accepted transfer. Failed transfers leave no row here: their answer lives
-- only in the idempotency record of the request that asked for them.
CREATE TABLE transfers (
    id                  bigint PRIMARY KEY,
    debit_account_id    bigint      NOT NULL REFERENCES accounts (id),
    credit_account_id   bigint      NOT NULL REFERENCES accounts (id),
    currency            char(3)     NOT NULL,
    amount_minor        bigint      NOT NULL CHECK (amount_minor > 0),
    -- Amount moved for good: equals amount_minor for an immediate transfer, the posted
    -- part for a posted hold, 0 while pending or once voided or expired.
    posted_amount_minor bigint      NOT NULL CHECK (posted_amount_minor >= 0),
    status              text        NOT NULL
                        CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
    -- A pending transfer is a hold; only holds ever change status after insertion.
    pending             boolean     NOT NULL,
    group_id            bigint,
    scope               text        NOT NULL,
    metadata            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    expires_at          timestamptz,
    created_at          timestamptz NOT NULL,
    resolved_at         timestamptz,
    CHECK (debit_account_id <> credit_account_id),
    CHECK (posted_amount_minor <= amount_minor),
    CHECK (pending OR status = 'posted')
);

-- The sweeper's work list: holds with a timeout that are still open.
CREATE INDEX transfers_open_holds_by_expiry ON transfers (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
CREATE INDEX transfers_by_group ON transfers (group_id) WHERE group_id IS NOT NULL;

-- One row per change to an account. posted_delta and pending_delta are credit-normal
-- (credit positive), so an account's balance is the sum of its entries, and the
-- *_after columns give the balance at that point of its history.
CREATE TABLE entries (
    account_id          bigint      NOT NULL,
    id                  bigint      NOT NULL,
    transfer_id         bigint      NOT NULL,
    kind                text        NOT NULL
                        CHECK (kind IN ('transfer', 'hold', 'post', 'void', 'expire')),
    posted_delta_minor  bigint      NOT NULL,
    pending_delta_minor bigint      NOT NULL,
    posted_after_minor  bigint      NOT NULL,
    pending_after_minor bigint      NOT NULL,
    created_at          timestamptz NOT NULL,
    PRIMARY KEY (account_id, id)
);

-- Exactly-once: a request's record is inserted before its effect, in the same
-- transaction, and carries its answer when that transaction commits.
CREATE TABLE idempotency_keys (
    scope       text        NOT NULL,
    key         text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint bytea       NOT NULL,
    result      bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);

-- Id generators draw a node number from here at start, so ids minted by concurrent
-- processes never collide.
CREATE SEQUENCE id_node_seq;
