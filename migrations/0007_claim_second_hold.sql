-- A Finalize that finds no hold in Redis settles through a *claim*. When it carries a
-- request token, the token names the hold it is about; if the request id was settled by
-- another hold, the token's hold is a second hold under a settled id that Redis lost
-- (a restart from an older snapshot), and its reported usage is charged on its own, under
-- the entry id the reaper would use (settlement:<customer>:<request>#<nonce>, 0004): once.
--
-- The one exception: a settlement that names no hold (a Finalize without a token, through
-- a claim) cannot say whether the token's hold is the one it settled, so a claim charges
-- nothing on top of it: never charge the same usage twice. Items mark themselves with
-- "claim": true; the check runs with the customer row locked, like every settlement.

CREATE OR REPLACE FUNCTION beam_settle_one(s JSONB) RETURNS JSONB
    LANGUAGE plpgsql AS $$
DECLARE
    v_tenant   TEXT := s->>'tenant';
    v_customer TEXT := s->>'customer_id';
BEGIN
    IF s ? 'fence' OR COALESCE((s->>'claim')::BOOLEAN, FALSE) THEN
        PERFORM 1 FROM customers
          WHERE tenant = v_tenant AND customer_id = v_customer FOR UPDATE;
    END IF;
    IF s ? 'fence' THEN
        IF beam_fenced(v_tenant, v_customer, s->'fence'->>'hold_id', s->'fence'->>'nonce',
                       (s->'fence'->>'attempt')::BIGINT)
           AND NOT EXISTS (SELECT 1 FROM requests
                            WHERE tenant = v_tenant AND customer_id = v_customer
                              AND request_id = s->>'request_id'
                              AND hold_nonce = s->>'hold_nonce') THEN
            RAISE EXCEPTION 'request % waited past its deadline: not charged, retry it',
                s->>'request_id' USING ERRCODE = 'BL004';
        END IF;
    END IF;
    IF COALESCE((s->>'claim')::BOOLEAN, FALSE)
       AND EXISTS (SELECT 1 FROM requests
                    WHERE tenant = v_tenant AND customer_id = v_customer
                      AND request_id = s->>'request_id' AND hold_nonce = '') THEN
        s := jsonb_set(s, '{charge_other_hold}', 'false'::JSONB);
    END IF;
    RETURN beam_settle_one_unfenced(s);
END;
$$;
