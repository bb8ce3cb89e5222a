-- The catalogue and the stock. Products are JSONB documents (the catalogue's shape belongs to
-- the storefront); stock is relational so reservations stay transactional.

CREATE TABLE products (
    sku        text        PRIMARY KEY,
    doc        jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stock (
    sku      text   PRIMARY KEY,
    on_hand  bigint NOT NULL DEFAULT 0 CHECK (on_hand >= 0),
    reserved bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    CHECK (reserved <= on_hand)
);

-- Every change of stock, for audit: received, reserved, released, committed.
CREATE TABLE stock_movements (
    id         bigserial   PRIMARY KEY,
    sku        text        NOT NULL,
    kind       text        NOT NULL,
    quantity   bigint      NOT NULL,
    order_id   text,
    event_key  text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
