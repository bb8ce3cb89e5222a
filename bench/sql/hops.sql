-- Where an order's time goes, hop by hop, in a fleet benchmark run kept with --keep-database:
--   psql "<the kept database's URL>" -v orders=1000 -f bench/sql/hops.sql
-- For the last :orders orders placed (the latency phase's, when it was the last phase), each
-- saga handler's inbox row: when the transaction that applied the event began
-- (processed_at is now() of that transaction, a group's start under group commit), as
-- milliseconds after the orders handler began applying the order's OrderPlaced; then the
-- order's terminal_at. Medians and p99.
WITH last AS (
    SELECT id, terminal_at FROM orders
     WHERE terminal_at IS NOT NULL
     ORDER BY placed_at DESC LIMIT :orders
), placed AS (
    SELECT p.order_id, p.processed_at AS t
      FROM processed_messages p JOIN last ON last.id = p.order_id
     WHERE p.handler = 'orders' AND p.detail_type = 'OrderPlaced'
), steps AS (
    SELECT p.handler || ' ← ' || p.detail_type AS step,
           extract(epoch FROM p.processed_at - placed.t) * 1000 AS ms
      FROM processed_messages p JOIN placed ON placed.order_id = p.order_id
     WHERE p.handler IN ('orders', 'inventory', 'payments', 'fulfillment')
    UNION ALL
    SELECT 'order terminal', extract(epoch FROM last.terminal_at - placed.t) * 1000
      FROM last JOIN placed ON placed.order_id = last.id
)
SELECT step,
       count(*) AS orders,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric) AS p50_ms,
       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric) AS p99_ms
  FROM steps
 GROUP BY step
 ORDER BY p50_ms;
