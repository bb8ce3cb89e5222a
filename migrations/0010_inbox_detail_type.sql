-- The inbox key gains the detail-type: (handler, event key, detail-type). A storefront that
-- reuses one id across detail-types (the order id on OrderPlaced and on the order's
-- OrderCancellationRequested) no longer has the second event taken for a duplicate of the first
-- and dropped. Every existing row already records its detail-type (the column has been NOT NULL
-- since 0001), so an event applied before this migration and redelivered after it still finds
-- its row and stays a duplicate. The BRIN index on processed_at (0009) is untouched.
--
-- The new key is built under the table's lock, which holds back inbox claims while it runs
-- (seconds per ten million rows). For a very large inbox, build it beforehand without blocking:
--   CREATE UNIQUE INDEX CONCURRENTLY processed_messages_scoped
--       ON processed_messages (handler, event_key, detail_type);
-- and this migration adopts it instead of building its own.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE c.relname = 'processed_messages_scoped' AND NOT i.indisvalid) THEN
        DROP INDEX processed_messages_scoped; -- a concurrent build that failed half way
    END IF;
    IF to_regclass('processed_messages_scoped') IS NULL THEN
        CREATE UNIQUE INDEX processed_messages_scoped
            ON processed_messages (handler, event_key, detail_type);
    END IF;
END $$;

ALTER TABLE processed_messages
    DROP CONSTRAINT processed_messages_pkey,
    ADD CONSTRAINT processed_messages_pkey PRIMARY KEY USING INDEX processed_messages_scoped;

-- lake_outbox keeps its unique event_key for now: the previous release's analytics inserts
-- with ON CONFLICT (event_key), which fails outright once no unique index on exactly that column
-- is left, so widening it waits for a migration after every worker runs this release (whose
-- insert names no conflict target).
