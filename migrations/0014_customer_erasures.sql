-- Erasure requests honoured by `orderfleet customer forget` (issue 14): who was forgotten,
-- when, and how many orders were pseudonymised. The customer's id stays: it is the store's own
-- opaque key, and the ledger and the orders' money still refer to it.
CREATE TABLE customer_erasures (
    customer_id text        PRIMARY KEY,
    erased_at   timestamptz NOT NULL DEFAULT now(),
    orders      integer     NOT NULL
);
