-- The relay's index (issue 16). Each worker's relay takes only its own sources' rows, oldest
-- first after those that failed before (`ORDER BY attempts, id`). Over `outbox (id)` alone it
-- read every unpublished row of every source and sorted them on each pass: with five relays
-- and a backlog, that was a fifth of the database's time in the fleet benchmark
-- (docs/BENCHMARKS.md). With the source and the order in the index, a pass reads the ten rows
-- it takes. The counts of unpublished rows (metrics, `orderfleet wait`) use it as well.
CREATE INDEX outbox_unpublished_by_source ON outbox (source, attempts, id)
    WHERE published_at IS NULL;
DROP INDEX outbox_unpublished;
