-- Analytics and personalization: the lake's outbox, and item-to-item "bought together"
-- co-occurrence fed by completed orders.

-- Events waiting for (or done with) their trip to the lake. The analytics handler inserts one
-- row per event in its own transaction; the lake shipper (src/lake.rs) sends pending rows to
-- Firehose with PutRecordBatch and marks each one shipped only when Firehose accepted it, so a
-- record that failed within a batch stays pending and is retried alone. `record` is exactly
-- the bytes sent: the EventBridge envelope as JSON, one line, newline-terminated, at most
-- Firehose's 1,000 KiB per record.
CREATE TABLE lake_outbox (
    id                 bigserial   PRIMARY KEY,
    event_key          text        NOT NULL UNIQUE,
    detail_type        text        NOT NULL,
    record             bytea       NOT NULL CHECK (octet_length(record) <= 1024000),
    enqueued_at        timestamptz NOT NULL DEFAULT now(),
    shipped_at         timestamptz,
    -- Firehose's RecordId for the accepted record.
    firehose_record_id text,
    -- Failed PutRecordBatch attempts (whole call, or this record's entry).
    attempts           integer     NOT NULL DEFAULT 0,
    last_error         text
);

CREATE INDEX lake_outbox_pending ON lake_outbox (id) WHERE shipped_at IS NULL;
CREATE INDEX lake_outbox_shipped ON lake_outbox (shipped_at) WHERE shipped_at IS NOT NULL;

-- One row per ordered pair of distinct SKUs bought in the same completed order, in both
-- directions ((a, b) and (b, a)), so that the recommendations for a SKU are a range scan of the
-- primary key. `count` is the number of completed orders that contained both.
CREATE TABLE co_purchases (
    sku        text   NOT NULL,
    other_sku  text   NOT NULL,
    count      bigint NOT NULL CHECK (count > 0),
    PRIMARY KEY (sku, other_sku),
    CHECK (sku <> other_sku)
);

-- The business key of personalization: each order is counted once, even when its
-- OrderCompleted arrives twice under different event keys.
CREATE TABLE personalization_orders (
    order_id    text        PRIMARY KEY,
    customer_id text        NOT NULL,
    skus        text[]      NOT NULL,
    counted_at  timestamptz NOT NULL DEFAULT now()
);
