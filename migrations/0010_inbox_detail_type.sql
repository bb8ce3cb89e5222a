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

-- The lake's belt to the inbox's braces, scoped the same way: the cancellation that reuses its
-- order's id is archived too.
ALTER TABLE lake_outbox
    DROP CONSTRAINT lake_outbox_event_key_key,
    ADD CONSTRAINT lake_outbox_event_key_detail_type_key UNIQUE (event_key, detail_type);
