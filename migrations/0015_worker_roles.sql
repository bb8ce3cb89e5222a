-- One database role per worker (issue 14): each may read and write exactly its own tables, the
-- inbox, and (if it emits events) the outbox. The tables, the ledger's append-only triggers and
-- every other object stay owned by the role that runs the migrations, which no worker uses, so
-- a compromised worker can neither write another worker's tables nor drop the ledger's
-- triggers. `orderfleet_operator` reads everything and writes nothing (`report`, `status`).
--
-- The roles are NOLOGIN groups: a deployment gives each worker a login that is a member of its
-- role (docs/deploy.md), and its own DATABASE_URL. Roles belong to the cluster, not to this
-- database, so they are created only if missing; the grants are this database's.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['orderfleet_orders', 'orderfleet_inventory', 'orderfleet_payments',
                             'orderfleet_fulfillment', 'orderfleet_notifications',
                             'orderfleet_analytics', 'orderfleet_personalization',
                             'orderfleet_operator']
    LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- made by another database of this cluster, or a rival migration
        END;
    END LOOP;
END
$$;

-- Every worker: its inbox rows (claimed, pruned with FOR UPDATE SKIP LOCKED), its heartbeat,
-- and the identity sequences of the tables it inserts into.
GRANT SELECT, INSERT, UPDATE, DELETE ON processed_messages, worker_heartbeats
    TO orderfleet_orders, orderfleet_inventory, orderfleet_payments, orderfleet_fulfillment,
       orderfleet_notifications, orderfleet_analytics, orderfleet_personalization;
-- A worker checks at startup that the schema is the version it needs.
GRANT SELECT ON schema_migrations
    TO orderfleet_orders, orderfleet_inventory, orderfleet_payments, orderfleet_fulfillment,
       orderfleet_notifications, orderfleet_analytics, orderfleet_personalization;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public
    TO orderfleet_orders, orderfleet_inventory, orderfleet_payments, orderfleet_fulfillment,
       orderfleet_notifications, orderfleet_analytics, orderfleet_personalization;

-- The workers that emit events: their outbox rows and the relay's work on them.
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox
    TO orderfleet_orders, orderfleet_inventory, orderfleet_payments, orderfleet_fulfillment;
GRANT SELECT, INSERT ON outbox_dead_letters
    TO orderfleet_orders, orderfleet_inventory, orderfleet_payments, orderfleet_fulfillment;

-- orders: orders and customers; reads the catalogue; hands the token to payments.
GRANT SELECT, INSERT, UPDATE, DELETE
    ON customers, orders, order_lines, order_cancellation_requests TO orderfleet_orders;
GRANT SELECT ON products TO orderfleet_orders;
-- Its ON CONFLICT (order_id) needs to read the key, never the token.
GRANT INSERT, SELECT (order_id) ON payment_methods TO orderfleet_orders;

-- inventory: the catalogue, stock, its movements and reservations.
GRANT SELECT, INSERT, UPDATE, DELETE
    ON products, stock, stock_movements, reservations TO orderfleet_inventory;

-- payments: payments, the provider attempts, the tokens orders handed over, the ledger
-- (append-only: no UPDATE or DELETE), and the sandbox provider's memory.
GRANT SELECT, INSERT, UPDATE, DELETE ON payments, payment_attempts TO orderfleet_payments;
GRANT SELECT ON payment_methods TO orderfleet_payments;
GRANT SELECT, INSERT ON ledger_accounts, ledger_transactions, ledger_postings
    TO orderfleet_payments;
GRANT SELECT, INSERT, UPDATE ON sandbox_provider_calls TO orderfleet_payments;

-- fulfillment: shipments, and the sandbox carrier's parcels.
GRANT SELECT, INSERT, UPDATE, DELETE ON shipments TO orderfleet_fulfillment;
GRANT SELECT, INSERT, UPDATE ON sandbox_carrier_parcels TO orderfleet_fulfillment;

-- notifications: its emails; reads what a message says (orders, customers, the catalogue and
-- what was bought together).
GRANT SELECT, INSERT, UPDATE, DELETE ON emails TO orderfleet_notifications;
GRANT SELECT ON customers, orders, order_lines, products, co_purchases
    TO orderfleet_notifications;

-- analytics: the lake outbox.
GRANT SELECT, INSERT, UPDATE, DELETE ON lake_outbox TO orderfleet_analytics;

-- personalization: co-purchases and the orders it counted.
GRANT SELECT, INSERT, UPDATE, DELETE ON co_purchases, personalization_orders
    TO orderfleet_personalization;
GRANT SELECT ON products TO orderfleet_personalization;

-- The operator: reads everything.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO orderfleet_operator;
