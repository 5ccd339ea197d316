-- Bank channels (engine/products/channels.py): top-ups and withdrawals through a bank.
--
-- A request is a hold between the channel's clearing account (a house account) and the
-- partner's account, opened with the row in one transaction and resolved exactly once:
-- posted or voided by the bank's signed callback, or voided by the deadline timer.

CREATE TABLE channel_requests (
    id              bigint      PRIMARY KEY,
    scope           text        NOT NULL,  -- the partner the request belongs to
    kind            text        NOT NULL CHECK (kind IN ('topup', 'withdrawal')),
    channel         text        NOT NULL CHECK (channel ~ '^[a-z]{1,16}$'),
    account_id      bigint      NOT NULL REFERENCES accounts (id),
    amount_minor    bigint      NOT NULL CHECK (amount_minor > 0),
    currency        char(3)     NOT NULL,
    -- The ledger hold (a transfer id). No foreign key: transfers are partitioned by time
    -- and old partitions are archived (engine/history.py); a key from here would pin them.
    hold_id         bigint      NOT NULL UNIQUE,
    state           text        NOT NULL
                    CHECK (state IN ('pending', 'succeeded', 'failed', 'timed_out')),
    destination     text,                  -- withdrawals: where the bank pays to
    notify_url      text,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    bank_reference  text,                  -- the bank's own id, from its callback
    failure_reason  text,
    deadline_at     timestamptz NOT NULL,  -- no callback by then: the hold is voided
    sent_at         timestamptz,           -- the bank acknowledged our request
    send_attempts   integer     NOT NULL DEFAULT 0,  -- dispatches, each of a few HTTP tries
    created_at      timestamptz NOT NULL,
    resolved_at     timestamptz,
    CHECK ((state = 'pending') = (resolved_at IS NULL))
);
-- The deadline timer's work list: only open requests are indexed.
CREATE INDEX channel_requests_due ON channel_requests (deadline_at) WHERE state = 'pending';

-- Every authentic callback a bank sent, with what it did: an audit trail of duplicates,
-- late answers and contradictions, none of which moves money.
CREATE TABLE channel_callbacks (
    id              bigint      PRIMARY KEY,
    request_id      bigint      NOT NULL REFERENCES channel_requests (id),
    status          text        NOT NULL CHECK (status IN ('succeeded', 'failed')),
    bank_reference  text,
    outcome         text        NOT NULL
                    CHECK (outcome IN ('applied', 'duplicate', 'late', 'conflict', 'mismatch')),
    received_at     timestamptz NOT NULL
);
CREATE INDEX channel_callbacks_by_request ON channel_callbacks (request_id, id);
