-- Usage analytics: spend by customer, model and time (docs/DATABASE.md, "Usage analytics").
--
-- After this migration usage_events holds exactly one row per ledger entry that spends
-- money: a request's settlement or expiry (written by beam_settle_one, 0004, next to its
-- ledger entry), a late Finalize's `adjustment` and the charge of a second hold under a
-- settled request id (`settlement:<customer>:<request>#<nonce>`), both written here by a
-- trigger on the ledger. An event's time is its ledger entry's created_at (the settlement
-- time: both rows are written by one database transaction, and now() is its start), and
-- its cost_grains is the entry's -amount_grains. So over any period and customer
--   Σ usage_events.cost_grains = Σ -transactions.amount_grains
--       of the settlement, expiry and adjustment entries,
-- which tests/integration/test_usage.py proves bucket by bucket.
--
-- New columns: cached_prompt_tokens (from the request row), request_count (1 for a
-- request's settlement, 0 for an adjustment or a second hold's charge, so `requests`
-- counts settled requests once), entry_type and transaction_id (the ledger entry).

-- Tables are locked in the order beam_settle_one writes them (the ledger, then usage_events),
-- so a settlement in flight during an upgrade waits for this migration instead of
-- deadlocking with it. Settlements wait until it commits (the backfill below reads the
-- whole ledger once).
LOCK TABLE transactions IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS cached_prompt_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS request_count SMALLINT NOT NULL DEFAULT 1;
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS entry_type TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS transaction_id TEXT NOT NULL DEFAULT '';

-- Tenant-wide reads (the top customers of a period).
CREATE INDEX IF NOT EXISTS usage_events_tenant_time_idx ON usage_events (tenant, time DESC);

-- Is this ledger entry a request's own settlement (the one beam_settle_one writes an event
-- for, with its token counts)? Its id is '<type>:<customer>:<request>'; an adjustment or a
-- second hold's charge ('...#<nonce>') is not.
CREATE OR REPLACE FUNCTION beam_is_request_settlement(
    p_type TEXT, p_transaction_id TEXT, p_customer TEXT, p_reference TEXT) RETURNS BOOLEAN
    LANGUAGE sql IMMUTABLE AS $$
    SELECT p_type IN ('settlement', 'expiry')
       AND p_transaction_id IS NOT DISTINCT FROM (p_type || ':' || p_customer || ':' || p_reference)
$$;

-- The event beam_settle_one (0004) inserts for a request's settlement carries neither its
-- ledger entry nor the cached prompt tokens: name the entry (the same id beam_settle_one
-- gave it) and copy the cached tokens from the request row it has just written. An event
-- that already names its entry (the trigger below, a later beam_settle_one) is kept as is.
CREATE OR REPLACE FUNCTION beam_usage_event_fill() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.transaction_id = '' THEN
        NEW.entry_type := CASE WHEN NEW.status = 'expired' THEN 'expiry' ELSE 'settlement' END;
        NEW.transaction_id := NEW.entry_type || ':' || NEW.customer_id || ':' || NEW.request_id;
        NEW.request_count := 1;
        NEW.cached_prompt_tokens := COALESCE(
            (SELECT r.cached_prompt_tokens FROM requests r
              WHERE r.tenant = NEW.tenant AND r.customer_id = NEW.customer_id
                AND r.request_id = NEW.request_id),
            NEW.cached_prompt_tokens);
    END IF;
    RETURN NEW;
END;
$$;

-- Every other spending entry (an adjustment, a second hold's charge) gets its event here,
-- in the database transaction (and subtransaction) that appends it: it commits or rolls
-- back with the entry. The ledger does not record token counts for these entries, so the
-- event carries the charge and the settled request's model, with zero tokens.
CREATE OR REPLACE FUNCTION beam_usage_from_ledger() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    v_model TEXT;
BEGIN
    IF beam_is_request_settlement(NEW.transaction_type, NEW.transaction_id, NEW.customer_id,
                                  NEW.reference_id) THEN
        RETURN NULL;  -- beam_settle_one writes this one, with the request's tokens
    END IF;
    SELECT r.model INTO v_model FROM requests r
     WHERE r.tenant = NEW.tenant AND r.customer_id = NEW.customer_id
       AND r.request_id = NEW.reference_id;
    INSERT INTO usage_events (time, tenant, customer_id, request_id, model, status,
           prompt_tokens, completion_tokens, cached_prompt_tokens, cost_grains, request_count,
           entry_type, transaction_id)
    VALUES (NEW.created_at, NEW.tenant, NEW.customer_id, COALESCE(NEW.reference_id, ''),
           COALESCE(v_model, ''), NEW.transaction_type, 0, 0, 0, -NEW.amount_grains, 0,
           NEW.transaction_type, NEW.transaction_id);
    RETURN NULL;
END;
$$;

-- The triggers before the backfill: with writers locked out until this migration commits,
-- no entry can miss its event, and the backfill sees every entry committed before.
DROP TRIGGER IF EXISTS usage_events_fill ON usage_events;
CREATE TRIGGER usage_events_fill
    BEFORE INSERT ON usage_events
    FOR EACH ROW EXECUTE FUNCTION beam_usage_event_fill();

DROP TRIGGER IF EXISTS transactions_usage_events ON transactions;
CREATE TRIGGER transactions_usage_events
    AFTER INSERT ON transactions
    FOR EACH ROW WHEN (NEW.transaction_type IN ('settlement', 'expiry', 'adjustment'))
    EXECUTE FUNCTION beam_usage_from_ledger();

-- Events written before this migration: name their entries, take the cached tokens.
UPDATE usage_events u
   SET entry_type = CASE WHEN u.status = 'expired' THEN 'expiry' ELSE 'settlement' END,
       transaction_id = CASE WHEN u.status = 'expired' THEN 'expiry' ELSE 'settlement' END
           || ':' || u.customer_id || ':' || u.request_id,
       request_count = 1,
       cached_prompt_tokens = COALESCE(
           (SELECT r.cached_prompt_tokens FROM requests r
             WHERE r.tenant = u.tenant AND r.customer_id = u.customer_id
               AND r.request_id = u.request_id), 0)
 WHERE u.transaction_id = '';

-- Spending entries that have no event yet get one each, at the entry's time: here every
-- adjustment and second hold's charge so far (and any settlement an older version did not
-- record); later, after restoring a dump that left usage_events out (docs/DATABASE.md),
-- the whole table (or, with p_since, the entries since then). Answers how many it wrote.
CREATE OR REPLACE FUNCTION beam_usage_backfill(p_since TIMESTAMPTZ DEFAULT NULL) RETURNS BIGINT
    LANGUAGE plpgsql AS $$
DECLARE
    v_count BIGINT;
BEGIN
    INSERT INTO usage_events (time, tenant, customer_id, request_id, model, status,
           prompt_tokens, completion_tokens, cached_prompt_tokens, cost_grains, request_count,
           entry_type, transaction_id)
    SELECT t.created_at, t.tenant, t.customer_id, COALESCE(t.reference_id, ''),
           COALESCE(r.model, ''),
           CASE WHEN own.is_request THEN COALESCE(r.status, t.transaction_type)
                ELSE t.transaction_type END,
           CASE WHEN own.is_request THEN COALESCE(r.prompt_tokens, 0) ELSE 0 END,
           CASE WHEN own.is_request THEN COALESCE(r.completion_tokens, 0) ELSE 0 END,
           CASE WHEN own.is_request THEN COALESCE(r.cached_prompt_tokens, 0) ELSE 0 END,
           -t.amount_grains,
           CASE WHEN own.is_request THEN 1 ELSE 0 END,
           t.transaction_type, t.transaction_id
      FROM transactions t
      CROSS JOIN LATERAL (SELECT beam_is_request_settlement(t.transaction_type,
                                 t.transaction_id, t.customer_id, t.reference_id)
                                 AS is_request) own
      LEFT JOIN requests r
        ON r.tenant = t.tenant AND r.customer_id = t.customer_id
       AND r.request_id = t.reference_id
     WHERE t.transaction_type IN ('settlement', 'expiry', 'adjustment')
       AND (p_since IS NULL OR t.created_at >= p_since)
       AND NOT EXISTS (SELECT 1 FROM usage_events u
                        WHERE u.tenant = t.tenant AND u.transaction_id = t.transaction_id);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

SELECT beam_usage_backfill();

-- TimescaleDB (when usage_events is a hypertable): an hourly continuous aggregate with
-- real-time aggregation (rows newer than the last refresh are read from usage_events), and
-- a refresh policy over the last 3 days every 30 minutes. Retention and compression are
-- set from settings by `beam migrate` (beam.adapters.usage_store.apply_policies), which
-- also materializes the history this migration found; until then, and wherever the
-- aggregate cannot be created, usage is read from usage_events itself. The aggregate is
-- trusted only once beam_state says 'usage_hourly' is 'complete'.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                    WHERE hypertable_name = 'usage_events'
                      AND hypertable_schema = current_schema()) THEN
        RETURN;
    END IF;
    BEGIN
        EXECUTE $sql$
            CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, tenant, customer_id, model,
                   sum(request_count) AS requests,
                   sum(cost_grains) AS charged_grains,
                   sum(prompt_tokens) AS prompt_tokens,
                   sum(completion_tokens) AS completion_tokens,
                   sum(cached_prompt_tokens) AS cached_prompt_tokens
              FROM usage_events
             GROUP BY time_bucket(INTERVAL '1 hour', time), tenant, customer_id, model
            WITH NO DATA
        $sql$;
        PERFORM add_continuous_aggregate_policy('usage_hourly',
            start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
            schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
        -- Nothing to materialize yet: the refresh policy keeps the aggregate complete.
        INSERT INTO beam_state (name, value)
        SELECT 'usage_hourly', 'complete' WHERE NOT EXISTS (SELECT 1 FROM usage_events)
        ON CONFLICT (name) DO NOTHING;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'usage_hourly not created (%): usage is read from usage_events', SQLERRM;
    END;
END
$$;
