-- Fulfillment: the intent to ship is committed before the carrier is called. A `shipping` row
-- says "the carrier may have (or may be about to have) this parcel"; it is written in a short
-- transaction of its own while the handler holds the order's `fulfillment:<id>` lock, and
-- becomes `shipped` or `cancelled` in the handler's transaction. A crash in between leaves it
-- `shipping`: the rerun asks the carrier again with the same key, and a stop request cancels
-- with the carrier before it records `cancelled`.
ALTER TABLE shipments DROP CONSTRAINT shipments_state_check;
ALTER TABLE shipments ADD CONSTRAINT shipments_state_check
    CHECK (state IN ('shipping', 'shipped', 'cancelled'));
ALTER TABLE shipments DROP CONSTRAINT shipments_check;
ALTER TABLE shipments ADD CONSTRAINT shipments_shipped_has_tracking
    CHECK (state <> 'shipped' OR tracking_number IS NOT NULL);

-- The sandbox carrier's own records, one parcel per idempotency key (the order id), written on
-- its own connection outside any handler transaction (a real carrier is another system). A
-- cancellation of a key never shipped is kept too, so that a later `ship` of that key is
-- refused rather than creating a parcel.
CREATE TABLE sandbox_carrier_parcels (
    idempotency_key text        PRIMARY KEY,
    tracking_number text        NOT NULL,
    ship_calls      integer     NOT NULL DEFAULT 0,
    cancel_calls    integer     NOT NULL DEFAULT 0,
    -- Set by the first `ship` of the key, unless it was cancelled before.
    shipped_at      timestamptz,
    -- Set by the first `cancel`; a parcel is live when shipped and not cancelled.
    cancelled_at    timestamptz
);
