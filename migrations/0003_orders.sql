-- The order saga's relational data: customers and orders (owned by orders), reservations
-- (owned by inventory), shipments (owned by fulfillment). Each worker writes only its own
-- tables; they share a database so that each handler's effects, its inbox row and its outbox
-- rows commit in one transaction.

CREATE TABLE customers (
    id         text        PRIMARY KEY,
    email      text        NOT NULL,
    name       text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per order, locked FOR UPDATE by every outcome event so that concurrent outcomes of
-- one order apply one at a time. `status` is the saga's state; the three *_state columns are
-- what orders has heard from inventory, payments and fulfillment (they only move forward).
CREATE TABLE orders (
    id                text        PRIMARY KEY,
    customer_id       text        REFERENCES customers (id),
    status            text        NOT NULL CHECK (status IN (
                          'accepted', 'ready_to_ship', 'shipped', 'completed',
                          'cancelling', 'cancelled', 'returning', 'returned', 'rejected')),
    reservation_state text        NOT NULL DEFAULT 'pending' CHECK (reservation_state IN (
                          'pending', 'reserved', 'rejected', 'committed', 'released')),
    payment_state     text        NOT NULL DEFAULT 'pending' CHECK (payment_state IN (
                          'pending', 'authorized', 'failed', 'captured', 'voided', 'refunded')),
    delivery_state    text        NOT NULL DEFAULT 'pending' CHECK (delivery_state IN (
                          'pending', 'shipped', 'delivered', 'failed')),
    -- NULL only for a rejected order whose total or currency could not be established.
    total_minor       bigint      CHECK (total_minor >= 0),
    currency          char(3)     CHECK (currency ~ '^[A-Z]{3}$'),
    payment_token     text        NOT NULL DEFAULT '',
    shipping_address  jsonb,
    rejection_reasons jsonb,
    cancel_requested  boolean     NOT NULL DEFAULT false,
    cancel_reason     text,
    tracking_number   text,
    placed_at         timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- When the order reached completed, cancelled, returned or rejected.
    terminal_at       timestamptz,
    CHECK (status = 'rejected'
           OR (customer_id IS NOT NULL AND total_minor IS NOT NULL AND currency IS NOT NULL))
);

CREATE INDEX orders_status ON orders (status);

CREATE TABLE order_lines (
    order_id         text    NOT NULL REFERENCES orders (id),
    line_no          integer NOT NULL,
    sku              text    NOT NULL,
    quantity         bigint  NOT NULL CHECK (quantity > 0),
    unit_price_minor bigint  NOT NULL CHECK (unit_price_minor >= 0),
    currency         char(3) NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

-- A cancellation that arrived before its OrderPlaced (the storefront's events are not ordered):
-- the order is cancelled as soon as it is placed.
CREATE TABLE order_cancellation_requests (
    order_id     text        PRIMARY KEY,
    reason       text        NOT NULL DEFAULT '',
    requested_at timestamptz NOT NULL DEFAULT now()
);

-- Inventory's decision per order and SKU. A row exists once inventory decided anything about
-- the order (reserved, rejected for shortage, or released before it was ever reserved), so a
-- late OrderAccepted cannot reserve for a cancelled order. Only 'reserved' rows hold stock:
-- stock.reserved = sum(quantity) over them, per SKU.
CREATE TABLE reservations (
    order_id   text        NOT NULL,
    sku        text        NOT NULL,
    quantity   bigint      NOT NULL CHECK (quantity > 0),
    state      text        NOT NULL CHECK (state IN ('reserved', 'rejected', 'released', 'committed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, sku)
);

CREATE INDEX reservations_open ON reservations (sku) WHERE state = 'reserved';

-- Fulfillment's decision per order: shipped (with a tracking number) or stopped before it left.
-- The primary key makes the first decision win.
CREATE TABLE shipments (
    order_id        text        PRIMARY KEY,
    state           text        NOT NULL CHECK (state IN ('shipped', 'cancelled')),
    carrier         text,
    tracking_number text        UNIQUE,
    delivery_state  text        CHECK (delivery_state IN ('in_transit', 'delivered', 'failed')),
    failure_reason  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (state = 'cancelled' OR tracking_number IS NOT NULL)
);
