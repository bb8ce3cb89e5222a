-- The runtime's own tables: the inbox that makes handlers idempotent, the outbox that makes
-- publishing transactional, and worker heartbeats for `orderfleet status`.

CREATE TABLE processed_messages (
    handler      text        NOT NULL,
    event_key    text        NOT NULL,
    detail_type  text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (handler, event_key)
);

CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    source       text        NOT NULL,
    detail_type  text        NOT NULL,
    detail       jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text
);

CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE worker_heartbeats (
    worker_id    uuid        PRIMARY KEY,
    handlers     text[]      NOT NULL,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    processed    bigint      NOT NULL DEFAULT 0,
    failed       bigint      NOT NULL DEFAULT 0,
    stopped_at   timestamptz
);
