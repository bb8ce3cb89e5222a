-- The worker deletes inbox rows older than its retention (src/runtime/retention.rs). Rows are
-- inserted in time order, so a BRIN index finds the old ones without a full scan and costs the
-- hot inbox insert next to nothing to keep up.
CREATE INDEX processed_messages_processed_at
    ON processed_messages USING brin (processed_at);
