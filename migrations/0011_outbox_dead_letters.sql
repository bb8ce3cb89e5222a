-- Outbox rows EventBridge will never accept (an entry over 256 KB, or refused per entry with a
-- code that says the entry itself is wrong). The relay moves a row here, with the reason, in
-- the transaction that deletes it from the outbox (src/outbox.rs), and goes on with the next
-- rows. An operator fixes the cause and re-inserts the row into the outbox, or drops it.
CREATE TABLE outbox_dead_letters (
    id               bigint      PRIMARY KEY,  -- the row's id in the outbox
    event_id         uuid        NOT NULL UNIQUE,
    source           text        NOT NULL,
    detail_type      text        NOT NULL,
    detail           jsonb       NOT NULL,
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL,
    reason           text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);
