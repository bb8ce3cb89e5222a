-- Customer emails (owned by notifications): one row per (order, kind), the business key that
-- makes "exactly one email per order and kind" hold across duplicate events and retries.
--
-- The notifications handler claims the row (INSERT ... ON CONFLICT DO NOTHING) in the
-- transaction that handles the event, sends, then records the outcome in that same
-- transaction. A concurrent handler of the same (order, kind) waits on the unique index until
-- the first commits (and then finds the row) or rolls back (and then claims it).
-- `orderfleet report` counts these rows by kind (`emails_by_kind`).
CREATE TABLE emails (
    id                  bigserial   PRIMARY KEY,
    order_id            text        NOT NULL,
    kind                text        NOT NULL CHECK (kind IN (
                            'confirmation', 'shipped', 'cancelled', 'refunded')),
    -- Never the address in full: see src/email/mask.rs.
    recipient_masked    text        NOT NULL,
    -- The Message-ID header, derived from (order, kind), so a repeat carries the same one.
    message_id          text        NOT NULL,
    transport           text        NOT NULL CHECK (transport IN ('file', 'smtp', 'ses')),
    -- 'sending' is never committed: the claiming transaction turns it into 'sent' or
    -- 'failed_permanent' before it commits, or rolls back and the row disappears.
    status              text        NOT NULL CHECK (status IN (
                            'sending', 'sent', 'failed_permanent')),
    -- Why it failed for good (masked), for failed_permanent.
    error               text,
    -- The transport's id: SES MessageId, the SMTP server's reply, the outbox file name.
    provider_message_id text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    UNIQUE (order_id, kind),
    CHECK ((status = 'sent') = (sent_at IS NOT NULL)),
    CHECK (status <> 'failed_permanent' OR error IS NOT NULL)
);
