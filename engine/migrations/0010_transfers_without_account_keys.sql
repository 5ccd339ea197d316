-- Transfers no longer carry foreign keys to accounts.
--
-- Why: every transfer the engine writes names two accounts it has just locked FOR UPDATE
-- in the same transaction (engine/store.py), and accounts are never deleted, so the keys
-- could only ever pass; yet PostgreSQL checked them on every insert, with an index lookup
-- and a KEY SHARE lock per account. Measured with the engine alone (transfers among 2,000
-- accounts, 256 submitters): PostgreSQL CPU per transfer 64-66 us with the keys, 58 us
-- without them (-11 %). `txengine reconcile` checks the same facts over the whole ledger
-- ("every transfer's accounts exist, in its currency").
-- The same for the archive's per-account totals (engine/history.py): staging them took a
-- KEY SHARE lock on each account, in no particular order, while batches held accounts
-- FOR UPDATE; seen as a deadlock between archiving and the write path under load.
--
-- By catalogue rather than by name: partitioning (0002) left them named *_fkey1. Dropping
-- the partitioned table's constraint drops its partitions' copies with it.
DO $$
DECLARE
    key_name name;
BEGIN
    FOR key_name IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'transfers'::regclass AND contype = 'f'
          AND confrelid = 'accounts'::regclass AND conparentid = 0
    LOOP
        EXECUTE format('ALTER TABLE transfers DROP CONSTRAINT %I', key_name);
    END LOOP;
    FOR key_name IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'archived_account_totals'::regclass AND contype = 'f'
    LOOP
        EXECUTE format('ALTER TABLE archived_account_totals DROP CONSTRAINT %I', key_name);
    END LOOP;
END
$$;
