-- Orders from a commerce platform (issue 15): what real orders carry besides their lines, the
-- platform's order number for humans and its ids for writing back, and the storefront
-- handler's own tables.

-- Discount, shipping and tax, each in the order's currency: total = lines - discount +
-- shipping + tax (tax only when not included in the lines' prices). Zero for orders from
-- before this migration and for storefronts that send none.
ALTER TABLE orders
    ADD COLUMN order_number      text,
    ADD COLUMN platform          text CHECK (platform IN ('shopify', 'commercetools')),
    ADD COLUMN platform_order_id text,
    ADD COLUMN discount_minor    bigint  NOT NULL DEFAULT 0 CHECK (discount_minor >= 0),
    ADD COLUMN shipping_minor    bigint  NOT NULL DEFAULT 0 CHECK (shipping_minor >= 0),
    ADD COLUMN tax_minor         bigint  NOT NULL DEFAULT 0 CHECK (tax_minor >= 0),
    ADD COLUMN tax_included      boolean NOT NULL DEFAULT false;

-- The support desk looks orders up by the number the customer quotes.
CREATE INDEX orders_order_number ON orders (order_number) WHERE order_number IS NOT NULL;

-- Payments posts the capture by its parts (store::ledger).
ALTER TABLE payments
    ADD COLUMN discount_minor bigint  NOT NULL DEFAULT 0 CHECK (discount_minor >= 0),
    ADD COLUMN shipping_minor bigint  NOT NULL DEFAULT 0 CHECK (shipping_minor >= 0),
    ADD COLUMN tax_minor      bigint  NOT NULL DEFAULT 0 CHECK (tax_minor >= 0),
    ADD COLUMN tax_included   boolean NOT NULL DEFAULT false;

INSERT INTO ledger_accounts (name, kind) VALUES
    -- Discounts given at sale (reduces revenue).
    ('sales_discounts', 'contra_revenue'),
    -- Shipping charged to customers.
    ('shipping_revenue', 'revenue'),
    -- Tax collected for the tax authorities.
    ('tax_payable', 'liability')
ON CONFLICT (name) DO NOTHING;

-- The storefront handler: the platform orders it translated (what a write-back needs), ...
CREATE TABLE platform_orders (
    order_id          text        PRIMARY KEY,
    platform          text        NOT NULL CHECK (platform IN ('shopify', 'commercetools')),
    platform_order_id text        NOT NULL,
    shop              text        NOT NULL DEFAULT '',
    order_number      text,
    -- The platform cancelled it itself: nothing to write back on our cancellation.
    cancelled_on_platform boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (platform, platform_order_id)
);

-- ... every write-back call, recorded before it is made (as payments records its provider
-- calls), so that a retry after a crash right after the call asks the platform whether it was
-- already done instead of doing it twice ...
CREATE TABLE platform_calls (
    idempotency_key text        PRIMARY KEY,
    order_id        text        NOT NULL,
    platform        text        NOT NULL,
    operation       text        NOT NULL CHECK (operation IN ('fulfill', 'cancel', 'refund')),
    state           text        NOT NULL CHECK (state IN ('started', 'done', 'failed')),
    attempts        integer     NOT NULL DEFAULT 1,
    -- The platform's id of what the call made (a fulfillment, a refund), or why it failed.
    result          text,
    first_call_at   timestamptz NOT NULL DEFAULT now(),
    last_call_at    timestamptz NOT NULL DEFAULT now(),
    done_at         timestamptz
);

CREATE INDEX platform_calls_order ON platform_calls (order_id);

-- ... and the topics it was sent but does not translate, counted.
CREATE TABLE platform_skipped_topics (
    platform  text        NOT NULL,
    topic     text        NOT NULL,
    events    bigint      NOT NULL DEFAULT 0,
    last_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (platform, topic)
);

DO $$
BEGIN
    CREATE ROLE orderfleet_storefront NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- made by another database of this cluster, or a rival migration
END
$$;

GRANT SELECT, INSERT, UPDATE ON processed_messages, worker_heartbeats TO orderfleet_storefront;
GRANT DELETE ON processed_messages TO orderfleet_storefront;
GRANT SELECT ON schema_migrations TO orderfleet_storefront;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO orderfleet_storefront;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO orderfleet_storefront;
GRANT SELECT, INSERT ON outbox_dead_letters TO orderfleet_storefront;
GRANT SELECT, INSERT, UPDATE ON platform_orders, platform_calls, platform_skipped_topics
    TO orderfleet_storefront;

-- The operator reads the new columns and tables (none holds personal data).
GRANT SELECT (order_number, platform, platform_order_id, discount_minor, shipping_minor,
              tax_minor, tax_included)
    ON orders TO orderfleet_operator;
GRANT SELECT (discount_minor, shipping_minor, tax_minor, tax_included)
    ON payments TO orderfleet_operator;
GRANT SELECT ON platform_orders, platform_calls, platform_skipped_topics TO orderfleet_operator;

-- The sandbox platform (providers::platform::Sandbox, the default for local runs): each
-- write-back call once per key, and how often it was asked.
CREATE TABLE sandbox_platform_calls (
    idempotency_key text        PRIMARY KEY,
    platform        text        NOT NULL,
    order_ref       text        NOT NULL,
    operation       text        NOT NULL,
    reference       text        NOT NULL,
    calls           integer     NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE ON sandbox_platform_calls TO orderfleet_storefront;
GRANT SELECT ON sandbox_platform_calls TO orderfleet_operator;

-- Shopify's inventory levels name an inventory item, not a SKU: the products webhooks tell
-- which SKU an item is, and the last level seen makes a new level a delta.
CREATE TABLE platform_inventory_items (
    platform       text   NOT NULL,
    item_id        text   NOT NULL,
    sku            text   NOT NULL,
    last_available bigint,
    -- When the platform measured that level: an older one delivered late changes nothing.
    last_level_at  timestamptz,
    PRIMARY KEY (platform, item_id)
);
GRANT SELECT, INSERT, UPDATE ON platform_inventory_items TO orderfleet_storefront;
GRANT SELECT ON platform_inventory_items TO orderfleet_operator;
