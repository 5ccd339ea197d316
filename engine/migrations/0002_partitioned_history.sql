-- History by time: transfers and entries become tables partitioned by id range.
--
-- Ids are time-ordered (engine/ids.py: milliseconds since 2025-01-01 in the bits above
-- bit 22), so a range of ids is a range of time, and the existing primary keys (transfers
-- PK(id), entries PK(account_id, id)) already contain the partition key. Partitions
-- cover fixed spans of days; engine/history.py creates them ahead of time and, past a
-- retention, detaches old ones into the `archive` schema (and optionally exports them to
-- files), adding what they held to archived_account_totals in the same transaction, so
-- that reconcile can still check every balance against its history.

-- One row per pair of partitions transfers_<name> and entries_<name>, which always cover
-- the same id range and are archived together.
CREATE TABLE history_partitions (
    name        text        PRIMARY KEY CHECK (name ~ '^p[0-9]{8}$'),
    lower_id    bigint      NOT NULL,  -- first id inside
    upper_id    bigint      NOT NULL,  -- first id after
    -- attached: part of transfers/entries; archived: detached, kept in schema `archive`;
    -- exported: written to files (export_path) and dropped from the database.
    state       text        NOT NULL CHECK (state IN ('attached', 'archived', 'exported')),
    transfers   bigint,                -- rows it held when archived
    entries     bigint,
    archived_at timestamptz,
    export_path text,
    -- Its rows of archived_account_totals have been added into the accounts' '*' rows.
    totals_folded boolean NOT NULL DEFAULT false,
    CHECK (lower_id < upper_id)
);
CREATE UNIQUE INDEX history_partitions_by_lower ON history_partitions (lower_id);

-- What archived history added up to, per account: a balance must equal these plus the
-- sum of the entries still online, and the posted totals these plus the transfers online.
-- Rows are written per partition before it is detached (and count only once its state is
-- no longer 'attached'), so the detach itself does no work under its lock; later they
-- are folded into one row per account, partition_name '*', so the table stays as small
-- as the set of accounts.
CREATE TABLE archived_account_totals (
    partition_name           text   NOT NULL,  -- history_partitions.name, or '*': folded
    account_id               bigint NOT NULL REFERENCES accounts (id),
    entries                  bigint NOT NULL,
    posted_delta_minor       bigint NOT NULL,
    pending_delta_minor      bigint NOT NULL,
    transfers_debited_minor  bigint NOT NULL,  -- sum of posted_amount_minor as debit
    transfers_credited_minor bigint NOT NULL,  -- and as credit
    PRIMARY KEY (partition_name, account_id)
);

CREATE SCHEMA IF NOT EXISTS archive;

-- Move the plain tables aside (their indexes too, so the names can be reused), create
-- the partitioned ones, copy the rows over, and drop the old tables.
ALTER TABLE transfers RENAME TO transfers_unpartitioned;
ALTER TABLE entries RENAME TO entries_unpartitioned;
ALTER INDEX transfers_pkey RENAME TO transfers_unpartitioned_pkey;
ALTER INDEX entries_pkey RENAME TO entries_unpartitioned_pkey;
ALTER INDEX transfers_open_holds_by_expiry RENAME TO transfers_unpartitioned_holds_by_expiry;
ALTER INDEX transfers_by_group RENAME TO transfers_unpartitioned_by_group;

CREATE TABLE transfers (
    id                  bigint      NOT NULL,
    debit_account_id    bigint      NOT NULL REFERENCES accounts (id),
    credit_account_id   bigint      NOT NULL REFERENCES accounts (id),
    currency            char(3)     NOT NULL,
    amount_minor        bigint      NOT NULL CHECK (amount_minor > 0),
    posted_amount_minor bigint      NOT NULL CHECK (posted_amount_minor >= 0),
    status              text        NOT NULL
                        CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
    pending             boolean     NOT NULL,
    group_id            bigint,
    scope               text        NOT NULL,
    metadata            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    expires_at          timestamptz,
    created_at          timestamptz NOT NULL,
    resolved_at         timestamptz,
    PRIMARY KEY (id),
    CHECK (debit_account_id <> credit_account_id),
    CHECK (posted_amount_minor <= amount_minor),
    CHECK (pending OR status = 'posted')
) PARTITION BY RANGE (id);

CREATE INDEX transfers_open_holds_by_expiry ON transfers (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
CREATE INDEX transfers_by_group ON transfers (group_id) WHERE group_id IS NOT NULL;
-- Archiving refuses a partition with an open hold (it may still be posted); this finds
-- them without reading the partition. Only holds are ever pending, so it stays small.
CREATE INDEX transfers_open_holds ON transfers (id) WHERE status = 'pending';

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
) PARTITION BY RANGE (id);

-- Creates the pair of partitions for [lower_id, upper_id) and records it. The maintenance
-- job (engine/history.py) calls this too, so both make partitions the same way.
CREATE FUNCTION create_history_partition(p_name text, p_lower bigint, p_upper bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF transfers FOR VALUES FROM (%s) TO (%s)',
                   'transfers_' || p_name, p_lower, p_upper);
    EXECUTE format('CREATE TABLE %I PARTITION OF entries FOR VALUES FROM (%s) TO (%s)',
                   'entries_' || p_name, p_lower, p_upper);
    INSERT INTO history_partitions (name, lower_id, upper_id, state)
    VALUES (p_name, p_lower, p_upper, 'attached');
END $$;

-- The first partition holds everything before the current 7-day span (any rows the
-- database had), then one per span up to four spans ahead; the job takes over from there.
DO $$
DECLARE
    epoch_ms  constant bigint := 1735689600000;  -- engine/ids.py EPOCH_MS
    span_ms   constant bigint := 7 * 86400000;
    now_ms    constant bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    start_ms  bigint := epoch_ms + ((now_ms - epoch_ms) / span_ms) * span_ms;
    i         int;
BEGIN
    PERFORM create_history_partition(
        to_char(to_timestamp(epoch_ms / 1000.0) AT TIME ZONE 'UTC', '"p"YYYYMMDD'),
        -9223372036854775808, (start_ms - epoch_ms) << 22);
    FOR i IN 0..4 LOOP
        PERFORM create_history_partition(
            to_char(to_timestamp((start_ms + i * span_ms) / 1000.0) AT TIME ZONE 'UTC',
                    '"p"YYYYMMDD'),
            (start_ms + i * span_ms - epoch_ms) << 22,
            (start_ms + (i + 1) * span_ms - epoch_ms) << 22);
    END LOOP;
END $$;

INSERT INTO transfers SELECT * FROM transfers_unpartitioned;
INSERT INTO entries SELECT * FROM entries_unpartitioned;
DROP TABLE transfers_unpartitioned;
DROP TABLE entries_unpartitioned;
