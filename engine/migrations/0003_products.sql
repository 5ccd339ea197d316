-- Shared tables of the payment products (engine/products): the house's own accounts and
-- the outbox of events for partners.

-- The house's accounts, one per purpose and currency (fees earned, a bank channel's
-- clearing account), created on first use. The account row is inserted by the same
-- transaction that wins this row, hence the deferred foreign key.
CREATE TABLE house_accounts (
    name       text    NOT NULL CHECK (name ~ '^[a-z0-9_.:-]{1,64}$'),
    currency   char(3) NOT NULL,
    account_id bigint  NOT NULL UNIQUE
               REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (name, currency)
);

-- Transactional outbox: an event row is written in the same transaction as the state
-- change it reports, so a partner is told about every change that committed and about
-- nothing that did not. The dispatcher (engine/products/webhooks.py) delivers it.
CREATE TABLE outbox_events (
    id          bigint      PRIMARY KEY,  -- the event id, the same on every delivery attempt
    scope       text        NOT NULL,     -- the partner the event belongs to
    type        text        NOT NULL CHECK (type ~ '^[a-z_]+\.[a-z_]+$'),
    subject_id  bigint      NOT NULL,     -- the trade, order, top-up ... it is about
    notify_url  text,                     -- where to deliver it; NULL: recorded only
    payload     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX outbox_events_by_subject ON outbox_events (subject_id, id);

-- Merchant fees: what the house takes of each settlement to a merchant, in basis points
-- (1 bp = 0.01 %). A merchant without a row pays none.
CREATE TABLE merchant_fees (
    account_id bigint      PRIMARY KEY REFERENCES accounts (id),
    rate_bp    integer     NOT NULL CHECK (rate_bp BETWEEN 0 AND 10000),
    updated_at timestamptz NOT NULL
);
