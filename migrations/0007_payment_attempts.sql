-- Payments: a record of every provider call we are about to make, committed before the call and
-- outside the handler's transaction. The provider acts on its own side whatever happens to our
-- transaction; if that transaction rolls back, this record is what lets a later compensation
-- (void or refund) find the key, replay it at the provider (same key, same outcome) and give the
-- money back. No foreign key to payments: the payment row may not be committed yet (or ever).
CREATE TABLE payment_attempts (
    idempotency_key  text        PRIMARY KEY,
    order_id         text        NOT NULL,
    operation        text        NOT NULL CHECK (operation IN ('authorize', 'capture', 'void', 'refund')),
    -- The request as sent, so that a replay sends exactly the same thing.
    payment_token    text        NOT NULL,
    amount_minor     bigint      NOT NULL CHECK (amount_minor >= 0),
    currency         char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    authorization_id text,
    started_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX payment_attempts_order ON payment_attempts (order_id);

-- Orders: a capture the provider declined after the parcel left is recorded, not just logged.
ALTER TABLE orders DROP CONSTRAINT orders_payment_state_check;
ALTER TABLE orders ADD CONSTRAINT orders_payment_state_check CHECK (payment_state IN (
    'pending', 'authorized', 'failed', 'captured', 'capture_failed', 'voided', 'refunded'));
