-- Risk rules, their counters, step-up challenges and the record of refusals
-- (engine/risk.py explains the rules; engine/store.py reads and writes these).

-- Defaults per account kind. NULL: no such limit.
CREATE TABLE risk_kind_rules (
    kind                    text PRIMARY KEY CHECK (kind IN ('user', 'merchant', 'system')),
    max_per_transfer_minor  bigint CHECK (max_per_transfer_minor > 0),
    daily_outflow_max_minor bigint CHECK (daily_outflow_max_minor >= 0),
    velocity_max_per_minute int    CHECK (velocity_max_per_minute >= 0),
    step_up_threshold_minor bigint CHECK (step_up_threshold_minor >= 0),
    updated_at              timestamptz NOT NULL
);

-- Overrides per account (NULL: the kind's default), and the counters. They live on the
-- account row so that the statement locking an account reads the counters the previous
-- lock holder committed, and the balance UPDATE writes them: exact, no extra round trip.
ALTER TABLE accounts
    ADD COLUMN risk_frozen                  boolean NOT NULL DEFAULT false,
    ADD COLUMN risk_max_per_transfer_minor  bigint CHECK (risk_max_per_transfer_minor > 0),
    ADD COLUMN risk_daily_outflow_max_minor bigint CHECK (risk_daily_outflow_max_minor >= 0),
    ADD COLUMN risk_velocity_max_per_minute int    CHECK (risk_velocity_max_per_minute >= 0),
    ADD COLUMN risk_step_up_threshold_minor bigint CHECK (risk_step_up_threshold_minor >= 0),
    -- Minutes since the Unix epoch (UTC) of the last counted transfer; the outflow is that
    -- minute's UTC day's, the transfer count that minute's. NULL: never counted.
    ADD COLUMN risk_counted_minute          bigint,
    ADD COLUMN risk_outflow_day_minor       bigint NOT NULL DEFAULT 0
                                            CHECK (risk_outflow_day_minor >= 0),
    ADD COLUMN risk_transfers_minute        int    NOT NULL DEFAULT 0
                                            CHECK (risk_transfers_minute >= 0);

-- A transfer above the payer's step-up threshold waits here for the payer's code.
CREATE TABLE step_up_challenges (
    id          bigint PRIMARY KEY,
    scope       text        NOT NULL,
    account_id  bigint      NOT NULL REFERENCES accounts (id),
    command     bytea       NOT NULL,  -- the CreateTransfers command, msgspec JSON
    salt        bytea       NOT NULL,
    code_hash   bytea       NOT NULL,  -- sha256(salt, id, code): the code itself is never kept
    attempts    int         NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    status      text        NOT NULL CHECK (status IN ('pending', 'confirmed', 'locked')),
    result_code text,                  -- the transfer's result once confirmed
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- The simulated SMS gateway: one message per challenge, to the payer. A real sender
-- would deliver and delete these; the code is in clear here as it is in any SMS queue.
CREATE TABLE step_up_outbox (
    challenge_id bigint PRIMARY KEY REFERENCES step_up_challenges (id),
    account_id   bigint      NOT NULL,
    message      text        NOT NULL,
    created_at   timestamptz NOT NULL
);

-- Every refusal by a risk rule, with its reason, written in the refused batch.
CREATE TABLE risk_refusals (
    id              bigint PRIMARY KEY,
    account_id      bigint      NOT NULL,
    code            text        NOT NULL,
    reason          text        NOT NULL,
    amount_minor    bigint,
    scope           text,                 -- the request's idempotency scope and key
    idempotency_key text,
    created_at      timestamptz NOT NULL
);
CREATE INDEX risk_refusals_by_account ON risk_refusals (account_id, id);
