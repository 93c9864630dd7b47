-- Beam's durable ledger. Applied once, in order, by beam.adapters.migrations (recorded in
-- schema_migrations with a checksum); every statement is safe to re-run.
--
-- Money is BIGINT grains. A customer's balance is the sum of its transactions; the cached
-- current_balance_grains carries balance_version (= number of its ledger entries), which is
-- what Redis compares before adopting a balance.

CREATE TABLE IF NOT EXISTS customers (
    tenant                       TEXT        NOT NULL,
    customer_id                  TEXT        NOT NULL,
    display_name                 TEXT        NOT NULL DEFAULT '',
    platform_user_id             TEXT        NOT NULL DEFAULT '',
    current_balance_grains       BIGINT      NOT NULL DEFAULT 0,
    balance_version              BIGINT      NOT NULL DEFAULT 0,
    lifetime_spent_grains        BIGINT      NOT NULL DEFAULT 0,
    overage_grains               BIGINT      NOT NULL DEFAULT 0,
    buffer_strategy              TEXT        NOT NULL DEFAULT 'conservative'
        CHECK (buffer_strategy IN ('conservative', 'balanced', 'aggressive')),
    hold_ttl_seconds             INTEGER     CHECK (hold_ttl_seconds BETWEEN 1 AND 86400),
    max_request_grains           BIGINT      CHECK (max_request_grains > 0),
    low_balance_threshold_grains BIGINT      CHECK (low_balance_threshold_grains >= 0),
    state                        TEXT        NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'suspended', 'closed')),
    created_at                   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, customer_id),
    CHECK (length(customer_id) BETWEEN 1 AND 128),
    CHECK (lifetime_spent_grains >= 0),
    CHECK (overage_grains >= 0),
    CHECK (balance_version >= 0)
);

-- The append-only ledger. transaction_id is the idempotency key (unique per tenant);
-- fingerprint detects a reused key with different parameters.
CREATE TABLE IF NOT EXISTS transactions (
    id                   BIGSERIAL   PRIMARY KEY,
    tenant               TEXT        NOT NULL,
    customer_id          TEXT        NOT NULL,
    transaction_id       TEXT        NOT NULL,
    transaction_type     TEXT        NOT NULL
        CHECK (transaction_type IN ('credit', 'debit', 'settlement', 'expiry', 'adjustment')),
    amount_grains        BIGINT      NOT NULL,
    balance_after_grains BIGINT      NOT NULL,
    balance_version      BIGINT      NOT NULL,
    reference_id         TEXT,
    description          TEXT        NOT NULL DEFAULT '',
    fingerprint          TEXT        NOT NULL DEFAULT '',
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (tenant, transaction_id),
    UNIQUE (tenant, customer_id, balance_version),
    FOREIGN KEY (tenant, customer_id) REFERENCES customers (tenant, customer_id)
);
CREATE INDEX IF NOT EXISTS transactions_customer_idx
    ON transactions (tenant, customer_id, id);

CREATE OR REPLACE FUNCTION beam_ledger_is_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on transactions is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
DROP TRIGGER IF EXISTS transactions_append_only ON transactions;
CREATE TRIGGER transactions_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION beam_ledger_is_append_only();

-- One row per settled request (written once, by the settlement that wins).
CREATE TABLE IF NOT EXISTS requests (
    tenant                TEXT        NOT NULL,
    customer_id           TEXT        NOT NULL,
    request_id            TEXT        NOT NULL,
    model                 TEXT        NOT NULL DEFAULT '',
    status                TEXT        NOT NULL,
    estimated_cost_grains BIGINT      NOT NULL DEFAULT 0,
    reserved_grains       BIGINT      NOT NULL DEFAULT 0,
    consumed_grains       BIGINT      NOT NULL DEFAULT 0,
    actual_cost_grains    BIGINT      NOT NULL DEFAULT 0,
    refunded_grains       BIGINT      NOT NULL DEFAULT 0,
    overage_grains        BIGINT      NOT NULL DEFAULT 0,
    prompt_tokens         BIGINT      NOT NULL DEFAULT 0,
    completion_tokens     BIGINT      NOT NULL DEFAULT 0,
    cached_prompt_tokens  BIGINT      NOT NULL DEFAULT 0,
    balance_after_grains  BIGINT      NOT NULL,
    balance_version       BIGINT      NOT NULL,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, customer_id, request_id),
    FOREIGN KEY (tenant, customer_id) REFERENCES customers (tenant, customer_id),
    CHECK (actual_cost_grains >= 0 AND refunded_grains >= 0 AND overage_grains >= 0)
);
CREATE INDEX IF NOT EXISTS requests_recent_idx
    ON requests (tenant, customer_id, completed_at DESC);
CREATE INDEX IF NOT EXISTS requests_by_id_idx ON requests (tenant, request_id);

-- API keys: SHA-256 of the key only. key_id is a non-secret handle (shown in lists/logs).
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash    TEXT        PRIMARY KEY CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    key_id      TEXT        NOT NULL UNIQUE,
    tenant      TEXT        NOT NULL,
    name        TEXT        NOT NULL DEFAULT '',
    role        TEXT        NOT NULL CHECK (role IN ('enforcer', 'reader', 'admin')),
    customers   TEXT[]      NOT NULL DEFAULT '{}',
    expires_at  TIMESTAMPTZ,
    revoked_at  TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS api_keys_tenant_name_idx ON api_keys (tenant, name);

-- Versioned prices: the newest version whose effective_from has passed applies.
CREATE TABLE IF NOT EXISTS model_prices (
    tenant                          TEXT        NOT NULL,
    model                           TEXT        NOT NULL,
    version                         BIGINT      NOT NULL,
    input_grains_per_million        BIGINT      NOT NULL CHECK (input_grains_per_million >= 0),
    output_grains_per_million       BIGINT      NOT NULL CHECK (output_grains_per_million >= 0),
    cached_input_grains_per_million BIGINT      NOT NULL
        CHECK (cached_input_grains_per_million >= 0),
    effective_from                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    source                          TEXT        NOT NULL DEFAULT '',
    created_at                      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, model, version)
);

-- Analytics: one event per settlement. A TimescaleDB hypertable when the extension exists.
CREATE TABLE IF NOT EXISTS usage_events (
    time              TIMESTAMPTZ NOT NULL,
    tenant            TEXT        NOT NULL,
    customer_id       TEXT        NOT NULL,
    request_id        TEXT        NOT NULL,
    model             TEXT        NOT NULL DEFAULT '',
    status            TEXT        NOT NULL,
    prompt_tokens     BIGINT      NOT NULL DEFAULT 0,
    completion_tokens BIGINT      NOT NULL DEFAULT 0,
    cost_grains       BIGINT      NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS usage_events_customer_time_idx
    ON usage_events (tenant, customer_id, time DESC);

-- CREATE EXTENSION timescaledb without the library in shared_preload_libraries is not an
-- error the EXCEPTION block can catch: TimescaleDB answers FATAL and the connection dies. So
-- the preload is checked first (entries may carry spaces, quotes or a $libdir/ path).
-- This file changed after release for that check: beam.adapters.migrations accepts the
-- earlier checksum of 0001 (databases that applied it are unaffected either way).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        RETURN;
    END IF;
    IF NOT EXISTS (
        SELECT 1
        FROM regexp_split_to_table(current_setting('shared_preload_libraries'), ',') AS lib
        WHERE regexp_replace(btrim(lib, E' \t"'), '^.*/', '') = 'timescaledb'
    ) THEN
        RAISE NOTICE 'timescaledb is installed but not in shared_preload_libraries; '
            'usage_events stays a plain table';
        RETURN;
    END IF;
    BEGIN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('usage_events', 'time', if_not_exists => TRUE,
                                  migrate_data => TRUE);
    EXCEPTION WHEN OTHERS THEN
        -- e.g. a role that may not create the extension: keep the plain table.
        RAISE NOTICE 'timescaledb unavailable (%); usage_events stays a plain table',
            SQLERRM;
    END;
END
$$;
