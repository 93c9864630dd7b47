-- Let-through usage is labelled: requests.let_through and usage_events.let_through.
--
-- A client's fail-open policy lets a request through when Beam cannot be reached, and
-- posts its usage later as an ordinary FinalizeRequest under the request's own id (without
-- a request token it settles through a claim). Its charge is computed and committed like
-- any other; nothing on the server said the app, not Beam, admitted it. Such a Finalize now
-- says let_through, and the settlement records it on the request row and on the request's
-- usage event, so the ledger and usage analytics show how much usage was let through.
--
-- The flag is a label: beam_settle_one_unfenced (0004, renamed by 0006) is redefined with
-- the very same body, plus the column in its two INSERTs, from the item's "let_through"
-- (FALSE when absent: an older process's items, or any other settlement). A replay or
-- another hold's charge answers the stored row as before, keeping the label stored with
-- it. A late let-through Finalize that finds its request already settled (its hold
-- expired and the reaper charged it) adjusts the charge as before, then labels the request
-- row and its expiry's and adjustment's events (PostgresStore.label_let_through: an UPDATE
-- of labels, never of money). Existing rows are FALSE: nothing before this migration
-- recorded the label.
--
-- beam_usage_backfill (0005), which rebuilds usage_events after a restore that left them
-- out, copies the label from the request row to the request's own settlement event.
--
-- TimescaleDB: the hourly continuous aggregate usage_hourly gets two sums,
-- let_through_requests and let_through_grains. A continuous aggregate's query cannot be
-- altered, so it is dropped and created again WITH NO DATA (a materialization cannot run
-- inside a migration's transaction), with its refresh policy; its retention policy, if
-- any, is set again by `beam migrate` (beam.adapters.usage_store.apply_policies), which
-- also materializes the history again and only then marks the aggregate complete. Until
-- then usage is read from usage_events itself, with the same answers.

-- Tables are locked in the order beam_settle_one writes them (requests, then usage_events),
-- so a settlement in flight during an upgrade waits for this migration instead of
-- deadlocking with it. Adding a column with a constant default rewrites nothing: the locks
-- are held only for this transaction's few statements.
LOCK TABLE requests IN ACCESS EXCLUSIVE MODE;
LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE;

ALTER TABLE requests ADD COLUMN IF NOT EXISTS let_through BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS let_through BOOLEAN NOT NULL DEFAULT FALSE;

-- 0004's beam_settle_one, unchanged but for let_through in INSERT INTO requests and
-- INSERT INTO usage_events.
CREATE OR REPLACE FUNCTION beam_settle_one_unfenced(s JSONB) RETURNS JSONB
    LANGUAGE plpgsql AS $$
DECLARE
    v_tenant   TEXT   := s->>'tenant';
    v_customer TEXT   := s->>'customer_id';
    v_request  TEXT   := s->>'request_id';
    v_nonce    TEXT   := s->>'hold_nonce';
    v_charged  BIGINT := (s->>'charged_grains')::BIGINT;
    v_type     TEXT   := CASE WHEN s->>'status' = 'expired' THEN 'expiry' ELSE 'settlement' END;
    v_before   BIGINT;
    v_version  BIGINT;
    v_existing requests%ROWTYPE;
    v_row      requests%ROWTYPE;
    v_entry    RECORD;
    v_orphan   JSONB := NULL;
    v_txid     TEXT;
BEGIN
    SELECT current_balance_grains, balance_version INTO v_before, v_version
      FROM customers WHERE tenant = v_tenant AND customer_id = v_customer FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'customer % not found', v_customer USING ERRCODE = 'BL003';
    END IF;
    SELECT * INTO v_existing FROM requests
     WHERE tenant = v_tenant AND customer_id = v_customer AND request_id = v_request;
    IF FOUND THEN
        IF v_existing.hold_nonce = v_nonce THEN
            RETURN jsonb_build_object('outcome', 'replay', 'row', to_jsonb(v_existing));
        END IF;
        IF (s->>'charge_other_hold')::BOOLEAN AND v_charged > 0 AND v_nonce <> '' THEN
            -- A second hold under a settled id: charged on its own, never settles again.
            -- One id whether a Finalize or the reaper charges it: never twice.
            v_txid := 'settlement:' || v_customer || ':' || v_request || '#' || v_nonce;
            SELECT balance_after_grains, balance_version INTO v_entry FROM transactions
             WHERE tenant = v_tenant AND transaction_id = v_txid;
            IF FOUND THEN
                v_orphan := jsonb_build_object('transaction_id', v_txid,
                    'balance_after_grains', v_entry.balance_after_grains,
                    'balance_version', v_entry.balance_version, 'replayed', TRUE);
            ELSE
                SELECT * INTO v_entry FROM beam_append_entry(v_tenant, v_customer, v_txid,
                    v_type, -v_charged, v_request, 'a second hold under a settled request id',
                    '', v_before, v_version);
                v_orphan := jsonb_build_object('transaction_id', v_txid,
                    'balance_after_grains', v_entry.balance, 'balance_version', v_entry.version,
                    'replayed', FALSE);
            END IF;
        END IF;
        RETURN jsonb_build_object('outcome', 'other_hold', 'row', to_jsonb(v_existing),
                                  'orphan', v_orphan);
    END IF;
    SELECT * INTO v_entry FROM beam_append_entry(v_tenant, v_customer,
        v_type || ':' || v_customer || ':' || v_request, v_type, -v_charged, v_request,
        s->>'status', '', v_before, v_version);
    INSERT INTO requests (tenant, customer_id, request_id, status, model,
           estimated_cost_grains, reserved_grains, consumed_grains, actual_cost_grains,
           refunded_grains, overage_grains, prompt_tokens, completion_tokens,
           cached_prompt_tokens, balance_after_grains, balance_version, created_at, hold_nonce,
           let_through)
    VALUES (v_tenant, v_customer, v_request, s->>'status', s->>'model',
           (s->>'estimated_grains')::BIGINT, (s->>'reserved_grains')::BIGINT,
           (s->>'consumed_grains')::BIGINT, v_charged, (s->>'refunded_grains')::BIGINT,
           beam_new_deficit(v_before, v_entry.balance), (s->>'prompt_tokens')::BIGINT,
           (s->>'completion_tokens')::BIGINT, (s->>'cached_prompt_tokens')::BIGINT,
           v_entry.balance, v_entry.version,
           COALESCE(to_timestamp((s->>'created_at_ms')::BIGINT / 1000.0), now()), v_nonce,
           COALESCE((s->>'let_through')::BOOLEAN, FALSE))
    RETURNING * INTO v_row;
    INSERT INTO usage_events (time, tenant, customer_id, request_id, model, status,
           prompt_tokens, completion_tokens, cost_grains, let_through)
    VALUES (now(), v_tenant, v_customer, v_request, s->>'model', s->>'status',
           (s->>'prompt_tokens')::BIGINT, (s->>'completion_tokens')::BIGINT, v_charged,
           COALESCE((s->>'let_through')::BOOLEAN, FALSE));
    RETURN jsonb_build_object('outcome', 'new', 'row', to_jsonb(v_row));
END;
$$;

-- 0005's beam_usage_backfill, plus the request's label on its own settlement's event (an
-- adjustment's or a second hold's charge is not labelled, as when written live).
CREATE OR REPLACE FUNCTION beam_usage_backfill(p_since TIMESTAMPTZ DEFAULT NULL) RETURNS BIGINT
    LANGUAGE plpgsql AS $$
DECLARE
    v_count BIGINT;
BEGIN
    INSERT INTO usage_events (time, tenant, customer_id, request_id, model, status,
           prompt_tokens, completion_tokens, cached_prompt_tokens, cost_grains, request_count,
           entry_type, transaction_id, let_through)
    SELECT t.created_at, t.tenant, t.customer_id, COALESCE(t.reference_id, ''),
           COALESCE(r.model, ''),
           CASE WHEN own.is_request THEN COALESCE(r.status, t.transaction_type)
                ELSE t.transaction_type END,
           CASE WHEN own.is_request THEN COALESCE(r.prompt_tokens, 0) ELSE 0 END,
           CASE WHEN own.is_request THEN COALESCE(r.completion_tokens, 0) ELSE 0 END,
           CASE WHEN own.is_request THEN COALESCE(r.cached_prompt_tokens, 0) ELSE 0 END,
           -t.amount_grains,
           CASE WHEN own.is_request THEN 1 ELSE 0 END,
           t.transaction_type, t.transaction_id,
           COALESCE(own.is_request AND r.let_through, FALSE)
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

-- TimescaleDB (when usage_events is a hypertable): usage_hourly again, with the two sums.
-- The old aggregate goes first, and with it 'complete': whatever happens below, no reader
-- trusts an aggregate without the new columns or without its history. If it cannot be
-- created, usage is read from usage_events (as 0005 does when it cannot create it).
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
    DELETE FROM beam_state WHERE name = 'usage_hourly';
    DROP MATERIALIZED VIEW IF EXISTS usage_hourly;
    BEGIN
        EXECUTE $sql$
            CREATE MATERIALIZED VIEW usage_hourly
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, tenant, customer_id, model,
                   sum(request_count) AS requests,
                   sum(cost_grains) AS charged_grains,
                   sum(prompt_tokens) AS prompt_tokens,
                   sum(completion_tokens) AS completion_tokens,
                   sum(cached_prompt_tokens) AS cached_prompt_tokens,
                   sum(CASE WHEN let_through THEN request_count ELSE 0 END)
                       AS let_through_requests,
                   sum(CASE WHEN let_through THEN cost_grains ELSE 0 END) AS let_through_grains
              FROM usage_events
             GROUP BY time_bucket(INTERVAL '1 hour', time), tenant, customer_id, model
            WITH NO DATA
        $sql$;
        PERFORM add_continuous_aggregate_policy('usage_hourly',
            start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
            schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
        -- Nothing to materialize: the refresh policy keeps the aggregate complete.
        INSERT INTO beam_state (name, value)
        SELECT 'usage_hourly', 'complete' WHERE NOT EXISTS (SELECT 1 FROM usage_events)
        ON CONFLICT (name) DO NOTHING;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'usage_hourly not created (%): usage is read from usage_events', SQLERRM;
    END;
END
$$;
