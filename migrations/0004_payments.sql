-- Payments: one row per order, the double-entry ledger, and the sandbox provider's own state.

-- `state` moves pending -> authorized | failed; authorized -> captured | voided;
-- captured -> refunded; pending | failed -> voided (nothing to void, but the order is settled).
-- The *_key columns are the idempotency keys sent to the provider, recorded when used.
CREATE TABLE payments (
    order_id         text        PRIMARY KEY,
    state            text        NOT NULL CHECK (state IN (
                         'pending', 'authorized', 'failed', 'captured', 'voided', 'refunded')),
    amount_minor     bigint      NOT NULL CHECK (amount_minor >= 0),
    currency         char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    payment_token    text        NOT NULL DEFAULT '',
    authorization_id text,
    capture_id       text,
    refund_id        text,
    authorize_key    text,
    capture_key      text,
    void_key         text,
    refund_key       text,
    captured_minor   bigint      NOT NULL DEFAULT 0,
    refunded_minor   bigint      NOT NULL DEFAULT 0,
    failure_code     text,
    failure_message  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (captured_minor BETWEEN 0 AND amount_minor),
    CHECK (refunded_minor BETWEEN 0 AND captured_minor)
);

CREATE INDEX payments_state ON payments (state);

-- The ledger. Postings are signed: positive is a debit, negative a credit. Every transaction
-- balances per currency (checked at commit by a deferred constraint trigger), and nothing in
-- the ledger is ever updated or deleted: a correction is a new transaction.
CREATE TABLE ledger_accounts (
    id   serial PRIMARY KEY,
    name text   NOT NULL UNIQUE,
    kind text   NOT NULL CHECK (kind IN ('asset', 'liability', 'revenue', 'contra_revenue', 'expense'))
);

INSERT INTO ledger_accounts (name, kind) VALUES
    -- What the payment provider owes us for captured payments, net of refunds.
    ('payments_clearing', 'asset'),
    -- Sales, recognised at capture.
    ('sales_revenue', 'revenue'),
    -- Refunds given back to customers (reduces revenue).
    ('refunds', 'contra_revenue');

CREATE TABLE ledger_transactions (
    id              bigserial   PRIMARY KEY,
    -- One money movement per key (e.g. capture:<order_id>): a retry cannot post twice.
    idempotency_key text        NOT NULL UNIQUE,
    order_id        text,
    kind            text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_transactions_order ON ledger_transactions (order_id);

CREATE TABLE ledger_postings (
    id             bigserial   PRIMARY KEY,
    transaction_id bigint      NOT NULL REFERENCES ledger_transactions (id),
    account_id     integer     NOT NULL REFERENCES ledger_accounts (id),
    amount_minor   bigint      NOT NULL CHECK (amount_minor <> 0),
    currency       char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_postings_transaction ON ledger_postings (transaction_id);

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER ledger_postings_append_only
    BEFORE UPDATE OR DELETE ON ledger_postings
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
CREATE TRIGGER ledger_postings_no_truncate
    BEFORE TRUNCATE ON ledger_postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_is_append_only();
CREATE TRIGGER ledger_transactions_append_only
    BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
CREATE TRIGGER ledger_transactions_no_truncate
    BEFORE TRUNCATE ON ledger_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_is_append_only();

-- Deferred to commit, so a transaction's postings can be inserted one by one.
CREATE FUNCTION ledger_transaction_balances() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    off record;
BEGIN
    SELECT currency, sum(amount_minor) AS total INTO off
      FROM ledger_postings
     WHERE transaction_id = NEW.transaction_id
     GROUP BY currency
    HAVING sum(amount_minor) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger transaction % does not balance: % % left over',
            NEW.transaction_id, off.total, off.currency
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_postings_balance
    AFTER INSERT ON ledger_postings
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_transaction_balances();

-- The sandbox payment provider's memory of every call, by idempotency key. It stands in for
-- state that lives at a real provider, so it is written outside the handlers' transactions:
-- a call that succeeded is remembered even if the handler's transaction then rolls back.
CREATE TABLE sandbox_provider_calls (
    idempotency_key text        PRIMARY KEY,
    operation       text        NOT NULL CHECK (operation IN ('authorize', 'capture', 'void', 'refund')),
    payment_token   text        NOT NULL,
    amount_minor    bigint,
    currency        char(3),
    -- Calls received for this key, including transient failures and replays.
    attempts        integer     NOT NULL DEFAULT 0,
    -- The outcome, once there is one; replays return it unchanged.
    result          jsonb,
    first_call_at   timestamptz NOT NULL DEFAULT now(),
    last_call_at    timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz
);
