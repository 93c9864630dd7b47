-- Group commit for settlements: one round trip and one commit settle a whole batch.
--
-- beam_settle(batch) takes a JSON array of settlements (the fields of beam.records
-- .Settlement, plus "i", the caller's index, and "charge_other_hold") and settles each
-- exactly as PostgresStore used to one by one: lock the customer row, refuse a second
-- settlement of the request (answer the first), append the ledger entry, move the cached
-- balance, version, lifetime spend and overage, insert the request row and its usage event.
-- Items are taken in (tenant, customer) order, so concurrent batches lock rows in one order
-- and cannot deadlock. Each item runs in its own subtransaction (BEGIN ... EXCEPTION): one
-- bad item answers its own error and never fails the others.
-- Answers a JSON array, one object per item: {"i", "outcome": new|replay|other_hold,
-- "row": <requests row>, "orphan": {transaction_id, balance_after_grains, balance_version,
-- replayed} | null} or {"i", "error": <SQLSTATE>, "message"}.

-- The overage an entry causes: how far it pushed the balance below zero that it was not
-- already below (PostgresStore's new_deficit is the same formula).
CREATE OR REPLACE FUNCTION beam_new_deficit(before BIGINT, after BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE AS $$
    SELECT GREATEST(0, GREATEST(0, -after) - GREATEST(0, -before))
$$;

-- Append one entry to a customer row this transaction has locked; answers its balance
-- and version. 'BL001' = the balance would exceed 2^53-1; 'BL002' = below -(2^53-1).
CREATE OR REPLACE FUNCTION beam_append_entry(
    p_tenant TEXT, p_customer TEXT, p_transaction_id TEXT, p_type TEXT, p_amount BIGINT,
    p_reference TEXT, p_description TEXT, p_fingerprint TEXT, p_before BIGINT,
    p_version BIGINT, OUT balance BIGINT, OUT version BIGINT)
    LANGUAGE plpgsql AS $$
BEGIN
    balance := p_before + p_amount;
    IF balance > 9007199254740991 THEN
        RAISE EXCEPTION 'the balance would exceed 9007199254740991 grains' USING ERRCODE = 'BL001';
    END IF;
    IF balance < -9007199254740991 THEN
        RAISE EXCEPTION 'the entry would overflow the balance' USING ERRCODE = 'BL002';
    END IF;
    version := p_version + 1;
    UPDATE customers SET current_balance_grains = balance, balance_version = version,
           lifetime_spent_grains = GREATEST(0, lifetime_spent_grains + CASE
               WHEN p_type IN ('settlement', 'expiry', 'adjustment') THEN -p_amount ELSE 0 END),
           overage_grains = overage_grains + beam_new_deficit(p_before, balance),
           updated_at = now()
     WHERE tenant = p_tenant AND customer_id = p_customer;
    INSERT INTO transactions (tenant, customer_id, transaction_id, transaction_type,
           amount_grains, balance_after_grains, balance_version, reference_id, description,
           fingerprint)
    VALUES (p_tenant, p_customer, p_transaction_id, p_type, p_amount, balance, version,
            p_reference, p_description, p_fingerprint);
END;
$$;

CREATE OR REPLACE FUNCTION beam_settle_one(s JSONB) RETURNS JSONB
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
           cached_prompt_tokens, balance_after_grains, balance_version, created_at, hold_nonce)
    VALUES (v_tenant, v_customer, v_request, s->>'status', s->>'model',
           (s->>'estimated_grains')::BIGINT, (s->>'reserved_grains')::BIGINT,
           (s->>'consumed_grains')::BIGINT, v_charged, (s->>'refunded_grains')::BIGINT,
           beam_new_deficit(v_before, v_entry.balance), (s->>'prompt_tokens')::BIGINT,
           (s->>'completion_tokens')::BIGINT, (s->>'cached_prompt_tokens')::BIGINT,
           v_entry.balance, v_entry.version,
           COALESCE(to_timestamp((s->>'created_at_ms')::BIGINT / 1000.0), now()), v_nonce)
    RETURNING * INTO v_row;
    INSERT INTO usage_events (time, tenant, customer_id, request_id, model, status,
           prompt_tokens, completion_tokens, cost_grains)
    VALUES (now(), v_tenant, v_customer, v_request, s->>'model', s->>'status',
           (s->>'prompt_tokens')::BIGINT, (s->>'completion_tokens')::BIGINT, v_charged);
    RETURN jsonb_build_object('outcome', 'new', 'row', to_jsonb(v_row));
END;
$$;

CREATE OR REPLACE FUNCTION beam_settle(batch JSONB) RETURNS JSONB
    LANGUAGE plpgsql AS $$
DECLARE
    v_item   JSONB;
    v_result JSONB;
    v_out    JSONB := '[]'::JSONB;
BEGIN
    FOR v_item IN
        SELECT value FROM jsonb_array_elements(batch)
         ORDER BY value->>'tenant', value->>'customer_id', (value->>'i')::INT
    LOOP
        BEGIN
            v_result := beam_settle_one(v_item);
        EXCEPTION WHEN OTHERS THEN
            v_result := jsonb_build_object('error', SQLSTATE, 'message', SQLERRM);
        END;
        v_out := v_out || jsonb_build_array(v_result || jsonb_build_object('i', v_item->'i'));
    END LOOP;
    RETURN v_out;
END;
$$;
