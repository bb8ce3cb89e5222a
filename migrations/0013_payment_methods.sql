-- Payment tokens stay with payments (issue 14). Orders validates the storefront's token and
-- hands it over here, in the transaction that accepts the order, instead of sending it on the
-- bus in OrderAccepted (version 2 of that event has no token). Payments reads it once, when it
-- creates the payment row; nothing else reads this table.
CREATE TABLE payment_methods (
    order_id      text        PRIMARY KEY,
    payment_token text        NOT NULL,
    stored_at     timestamptz NOT NULL DEFAULT now()
);

-- Orders kept a copy of every token and never read it back. Workers of the previous version
-- still write one while a deploy rolls (they send the token in OrderAccepted version 1, which
-- payments still applies); once none is left the column can be dropped.
UPDATE orders SET payment_token = '' WHERE payment_token <> '';
