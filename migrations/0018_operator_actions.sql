-- The support desk's actions (issue 15, part 2): `orderfleet order refund` and `order cancel`.
--
-- Every action is audited in `operator_actions` (who asked, when, why, and what came of it) and
-- travels as an event through the outbox, in one transaction, so there is never an action
-- without its event or an event without its record. The operator role writes neither table
-- directly: it calls `operator_request`, which runs as the owner of the schema (SECURITY
-- DEFINER) and can only write these two rows, with a detail it builds itself, under the source
-- `orderfleet.operator`. The handler that applies the action (payments for a refund, orders
-- for a cancellation) records the outcome in the same row.
CREATE TABLE operator_actions (
    id             bigserial   PRIMARY KEY,
    order_id       text        NOT NULL,
    action         text        NOT NULL CHECK (action IN ('refund', 'cancel')),
    -- Refunds only: the amount asked for, in the order's currency.
    amount_minor   bigint      CHECK (amount_minor > 0),
    currency       char(3),
    reason         text        NOT NULL CHECK (btrim(reason) <> ''),
    -- Who the operator says they are (--operator, ORDERFLEET_OPERATOR or $USER) ...
    operator       text        NOT NULL CHECK (btrim(operator) <> ''),
    -- ... and the database login that asked, which they cannot choose.
    db_user        text        NOT NULL DEFAULT session_user,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    -- The event that carries the action.
    event_id       uuid        NOT NULL UNIQUE,
    -- requested: not applied yet; pending: under way (a parcel being stopped); applied; refused.
    outcome        text        NOT NULL DEFAULT 'requested'
                               CHECK (outcome IN ('requested', 'pending', 'applied', 'refused')),
    outcome_detail text,
    decided_at     timestamptz,
    CHECK ((action = 'refund') = (amount_minor IS NOT NULL AND currency IS NOT NULL))
);

CREATE INDEX operator_actions_order ON operator_actions (order_id);

-- Records an operator's action on `p_order_id` and the event that carries it, in the caller's
-- transaction; returns the action's id. A refund names its amount in the order's currency.
CREATE FUNCTION operator_request(p_order_id text, p_action text, p_amount_minor bigint,
                                 p_reason text, p_operator text)
    RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    -- A SECURITY DEFINER function must not resolve names through the caller's search path.
    SET search_path = public, pg_temp
AS $$
DECLARE
    v_currency    text;
    v_id          bigint;
    v_event       uuid := gen_random_uuid();
    v_detail_type text;
    v_detail      jsonb;
BEGIN
    SELECT currency INTO v_currency FROM orders WHERE id = p_order_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no order %', p_order_id USING ERRCODE = 'no_data_found';
    END IF;
    IF p_action = 'refund' THEN
        IF p_amount_minor IS NULL OR p_amount_minor <= 0 OR v_currency IS NULL THEN
            RAISE EXCEPTION 'a refund of order % needs a positive amount in its currency',
                p_order_id USING ERRCODE = 'check_violation';
        END IF;
        v_detail_type := 'RefundRequested';
    ELSIF p_action = 'cancel' THEN
        IF p_amount_minor IS NOT NULL THEN
            RAISE EXCEPTION 'a cancellation has no amount' USING ERRCODE = 'check_violation';
        END IF;
        v_currency := NULL;
        v_detail_type := 'OperatorCancellationRequested';
    ELSE
        RAISE EXCEPTION 'unknown operator action %', p_action USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO operator_actions (order_id, action, amount_minor, currency, reason, operator,
                                  event_id)
    VALUES (p_order_id, p_action, p_amount_minor, v_currency, p_reason, p_operator, v_event)
    RETURNING id INTO v_id;
    v_detail := jsonb_build_object(
        'version', 1,
        'event_id', v_event::text,
        'order_id', p_order_id,
        'action_id', v_id,
        'reason', p_reason,
        'operator', p_operator,
        'requested_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
    IF p_action = 'refund' THEN
        v_detail := v_detail || jsonb_build_object(
            'amount', jsonb_build_object('amount_minor', p_amount_minor, 'currency', v_currency));
    END IF;
    INSERT INTO outbox (event_id, source, detail_type, detail)
    VALUES (v_event, 'orderfleet.operator', v_detail_type, v_detail);
    RETURN v_id;
END
$$;

REVOKE ALL ON FUNCTION operator_request(text, text, bigint, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION operator_request(text, text, bigint, text, text) TO orderfleet_operator;
GRANT SELECT ON operator_actions TO orderfleet_operator;
-- The handlers that apply the actions record their outcome, and nothing else.
GRANT SELECT, UPDATE (outcome, outcome_detail, decided_at) ON operator_actions
    TO orderfleet_payments, orderfleet_orders;

-- The inbox remembers which order each event was about, so that `order show` can tell what
-- arrived at each handler. NULL for events about no order and for rows from before. The index
-- is partial and small next to the key; on a very large inbox, build it beforehand with
--   CREATE INDEX CONCURRENTLY processed_messages_order ON processed_messages (order_id)
--       WHERE order_id IS NOT NULL;
-- and this migration keeps it.
ALTER TABLE processed_messages ADD COLUMN order_id text;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE c.relname = 'processed_messages_order' AND NOT i.indisvalid) THEN
        DROP INDEX processed_messages_order; -- a concurrent build that failed half way
    END IF;
    IF to_regclass('processed_messages_order') IS NULL THEN
        CREATE INDEX processed_messages_order ON processed_messages (order_id)
            WHERE order_id IS NOT NULL;
    END IF;
END $$;
