-- Email deliverability (issue 15, section 3), owned by notifications.
--
-- Addresses are never stored here in full: the suppression list would otherwise become a
-- second copy of the customers' emails. Each is kept as a keyed hash (`hmac-sha256:` and 32
-- hex digits of HMAC-SHA256 of the trimmed, lower-cased address under
-- ORDERFLEET_EMAIL_HASH_KEY, see src/domain/deliverability.rs) and a masked form for people
-- (`a***@example.com`).

-- Addresses no email goes to any more: a permanent bounce or a complaint reported by SES.
-- `orderfleet email suppressions list|remove` reads and deletes rows (the operator role).
CREATE TABLE email_suppressions (
    address_hash     text        PRIMARY KEY CHECK (address_hash ~ '^hmac-sha256:[0-9a-f]{32}$'),
    address_masked   text        NOT NULL,
    reason           text        NOT NULL CHECK (reason IN ('bounce', 'complaint')),
    -- SES's bounce subtype or complaint feedback type, when it gave one.
    detail           text,
    -- The EventBridge id of the first event that suppressed the address, and of the last one.
    source_event_id  text        NOT NULL,
    last_event_id    text        NOT NULL,
    -- SES's Message-ID of the email that bounced or was complained about (last one).
    ses_message_id   text,
    events           integer     NOT NULL DEFAULT 1,
    first_seen       timestamptz NOT NULL,
    last_seen        timestamptz NOT NULL
);

-- Transient (soft) bounces: counted per address, never suppressing.
CREATE TABLE email_transient_bounces (
    address_hash     text        PRIMARY KEY CHECK (address_hash ~ '^hmac-sha256:[0-9a-f]{32}$'),
    address_masked   text        NOT NULL,
    bounces          integer     NOT NULL DEFAULT 1,
    last_event_id    text        NOT NULL,
    first_seen       timestamptz NOT NULL,
    last_seen        timestamptz NOT NULL
);

-- Customers who opted out of marketing email (the recommendations email): through the signed
-- unsubscribe link (the shop's page publishes MarketingOptOut) or through support
-- (`orderfleet email unsubscribe`). Transactional email still goes out.
CREATE TABLE marketing_opt_outs (
    customer_id      text        PRIMARY KEY,
    channel          text        NOT NULL CHECK (channel IN ('link', 'support')),
    event_id         text        NOT NULL,
    opted_out_at     timestamptz NOT NULL DEFAULT now()
);

-- ... and by address (its keyed hash, as in email_suppressions), so that an opt-out holds for
-- whoever uses the address next: a guest checkout gets a new customer id with every order.
CREATE TABLE marketing_opt_out_addresses (
    address_hash     text        PRIMARY KEY,
    channel          text        NOT NULL CHECK (channel IN ('link', 'support')),
    event_id         text        NOT NULL,
    opted_out_at     timestamptz NOT NULL DEFAULT now()
);

-- An email not sent, and why: the address is suppressed, the customer opted out of
-- marketing. `orderfleet order show` and `report` read it.
ALTER TABLE emails DROP CONSTRAINT emails_kind_check;
ALTER TABLE emails ADD CONSTRAINT emails_kind_check CHECK (kind IN (
    'confirmation', 'shipped', 'cancelled', 'refunded', 'recommendations'));
ALTER TABLE emails DROP CONSTRAINT emails_status_check;
ALTER TABLE emails ADD CONSTRAINT emails_status_check CHECK (status IN (
    'sending', 'sent', 'failed_permanent', 'skipped'));
ALTER TABLE emails ADD COLUMN skip_reason text;
ALTER TABLE emails ADD CONSTRAINT emails_skip_reason_check
    CHECK ((status = 'skipped') = (skip_reason IS NOT NULL));

GRANT SELECT, INSERT, UPDATE ON email_suppressions, email_transient_bounces, marketing_opt_outs,
    marketing_opt_out_addresses TO orderfleet_notifications;
-- The operator lists and removes suppressions (the hash and masked form only: no address),
-- reads the counts and the opt-outs (customer ids).
GRANT SELECT, DELETE ON email_suppressions TO orderfleet_operator;
GRANT SELECT ON email_transient_bounces, marketing_opt_outs, marketing_opt_out_addresses
    TO orderfleet_operator;
