-- Partners: who may call /v1, with which credentials, how fast; the nonces they used;
-- and the append-only audit log of administrative actions.

-- A partner's id is also the scope of everything it creates (accounts, transfers,
-- idempotency keys), so partners never see each other's rows.
CREATE TABLE partners (
    id          text        PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    algorithm   text        NOT NULL CHECK (algorithm IN ('hmac-sha256', 'rsa2')),
    status      text        NOT NULL CHECK (status IN ('active', 'disabled')),
    -- Token bucket: rate_per_s tokens a second, at most burst saved up.
    rate_per_s  integer     NOT NULL CHECK (rate_per_s BETWEEN 1 AND 1000000),
    burst       integer     NOT NULL CHECK (burst BETWEEN 1 AND 10000000),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

-- Credentials, one row per version. The current one has expires_at NULL; rotation sets
-- the previous one's expires_at to the end of the overlap. HMAC secrets are kept
-- encrypted (Fernet, key outside the database) because verifying needs the secret
-- itself; RSA2 partners give a public key, which is no secret.
CREATE TABLE partner_credentials (
    partner_id     text        NOT NULL REFERENCES partners (id),
    version        integer     NOT NULL CHECK (version >= 1),
    secret_sealed  bytea,
    public_key_pem text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    PRIMARY KEY (partner_id, version),
    CHECK ((secret_sealed IS NULL) <> (public_key_pem IS NULL))
);

-- Nonces seen within the timestamp window, shared by every gateway process. A unique
-- (partner, nonce) insert is the replay check; the sweeper deletes rows past the window.
CREATE TABLE partner_nonces (
    partner_id text        NOT NULL,
    nonce      text        NOT NULL CHECK (length(nonce) BETWEEN 1 AND 64),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partner_id, nonce)
);
CREATE INDEX partner_nonces_by_age ON partner_nonces (seen_at);

-- The shared token bucket of each partner; gateway processes lease tokens in chunks.
CREATE TABLE partner_rate_buckets (
    partner_id  text             PRIMARY KEY REFERENCES partners (id),
    tokens      double precision NOT NULL,
    refilled_at timestamptz      NOT NULL
);

-- Who did what, when: operators (the CLI) and partners (administrative requests).
-- Append-only, enforced here rather than trusted to the code.
CREATE TABLE audit_log (
    id      bigserial   PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor   text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    action  text        NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
    subject text        NOT NULL CHECK (length(subject) BETWEEN 1 AND 200),
    details jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_no_update_or_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
