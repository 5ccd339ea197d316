-- Webhook delivery (engine/products/webhooks.py) and daily statements
-- (engine/products/statements.py).

-- One delivery per outbox event that has a notify_url, inserted by the same statement
-- as the event (Step.notify), so an event of a step that rolled back has no delivery.
-- Dispatchers in every gateway process claim due rows (FOR UPDATE SKIP LOCKED), lease
-- them by moving next_attempt_at past the send's timeout, and record the attempt only
-- if their claim_id is still the row's: the claim_id is a fencing token, so a send that
-- outlived its lease cannot overwrite the newer attempt's outcome.
CREATE TABLE webhook_deliveries (
    id               bigint      PRIMARY KEY,
    event_id         bigint      NOT NULL UNIQUE REFERENCES outbox_events (id),
    scope            text        NOT NULL,  -- the partner, copied from the event
    url              text        NOT NULL,
    -- pending: waiting for its next attempt (or being sent); delivered: answered 2xx
    -- "success"; dead: the retry schedule ran out (or the event cannot be sent at all).
    status           text        NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts BETWEEN 0 AND 100),
    next_attempt_at  timestamptz,           -- when status = 'pending': due time or lease end
    claim_id         bigint,                -- the dispatcher run that holds the lease
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text        CHECK (length(last_error) <= 300),
    created_at       timestamptz NOT NULL,
    delivered_at     timestamptz,
    CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_scope ON webhook_deliveries (scope, id);

-- Signing secrets, per partner scope. The current secret has no expiry; a rotation
-- gives the old ones an expiry (the overlap) and they sign alongside the new one until
-- then, so a receiver can switch secrets without rejecting a single delivery.
CREATE TABLE webhook_secrets (
    id         bigint      PRIMARY KEY,
    scope      text        NOT NULL,
    secret     text        NOT NULL CHECK (length(secret) BETWEEN 32 AND 128),
    created_at timestamptz NOT NULL,
    expires_at timestamptz
);
CREATE UNIQUE INDEX webhook_secrets_current ON webhook_secrets (scope) WHERE expires_at IS NULL;
CREATE INDEX webhook_secrets_by_scope ON webhook_secrets (scope, created_at);

-- Statements read one account's entries of one UTC day. A BRIN index on created_at
-- (entries are appended in time order) narrows that to the day's blocks for almost no
-- cost on the write path, where a btree on (account_id, created_at) would add a second
-- full index to every entry insert.
CREATE INDEX entries_created_at_brin ON entries USING brin (created_at);
