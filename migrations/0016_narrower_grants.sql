-- Narrower grants after a review of 0015 against every statement the workers run.
--
-- The operator role reads what `orderfleet report` and `status` need and no personal data: no
-- customers, no payment tokens, no addresses. Table-wide SELECT is replaced by column lists
-- where a table mixes both.
REVOKE SELECT ON customers, payment_methods, payment_attempts, sandbox_carrier_parcels,
                 sandbox_provider_calls, payments, orders
    FROM orderfleet_operator;
GRANT SELECT (order_id, state, amount_minor, currency, authorization_id, capture_id, refund_id,
              authorize_key, capture_key, void_key, refund_key, captured_minor, refunded_minor,
              failure_code, failure_message, created_at, updated_at)
    ON payments TO orderfleet_operator;
GRANT SELECT (id, customer_id, status, reservation_state, payment_state, delivery_state,
              total_minor, currency, rejection_reasons, cancel_requested, cancel_reason,
              tracking_number, placed_at, created_at, updated_at, terminal_at)
    ON orders TO orderfleet_operator;
GRANT SELECT (idempotency_key, operation, amount_minor, currency, attempts, result,
              first_call_at, last_call_at, decided_at)
    ON sandbox_provider_calls TO orderfleet_operator;

-- Deletes no worker makes, and updates of rows that are only ever appended.
REVOKE DELETE ON worker_heartbeats
    FROM orderfleet_orders, orderfleet_inventory, orderfleet_payments, orderfleet_fulfillment,
         orderfleet_notifications, orderfleet_analytics, orderfleet_personalization;
REVOKE DELETE ON customers, orders, order_lines FROM orderfleet_orders;
REVOKE UPDATE ON order_lines FROM orderfleet_orders;
REVOKE DELETE ON products, stock, stock_movements FROM orderfleet_inventory;
REVOKE UPDATE ON stock_movements FROM orderfleet_inventory;
REVOKE DELETE ON payments, payment_attempts FROM orderfleet_payments;
REVOKE INSERT ON ledger_accounts FROM orderfleet_payments;
REVOKE DELETE ON shipments FROM orderfleet_fulfillment;
REVOKE DELETE ON emails FROM orderfleet_notifications;
