-- Publishing on commit (src/store/outbox.rs, `Handoff`). The task that commits a handler's
-- events writes them claimed until `claimed_until` and publishes them itself straight after
-- the commit; relays pass over a row while its claim holds. A claim left by a process that died
-- before its hand-off finished runs out, and then any relay publishes the row.
ALTER TABLE outbox ADD COLUMN claimed_until timestamptz;
