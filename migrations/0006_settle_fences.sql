-- Fences: a commit that waited past its hold's deadline is refused once the reaper has
-- abandoned the hold.
--
-- A settlement reserves its charge in Redis (a settling hold), commits here, then releases
-- the hold. If the commit has not come by the hold's deadline, the reaper abandons the
-- hold and Redis stops reserving the charge. A commit still queued at that moment (a
-- paused process, a long wait for a pool connection) must then never land: nothing would
-- reserve it, and Redis would offer money the ledger has spent. So the reaper, holding the
-- customer row FOR SHARE (every commit of that customer takes it FOR UPDATE first), looks
-- for the commit and writes a fence naming the hold, its nonce and how many settlements
-- had begun on it; after that, a commit of any of those attempts answers BL004 and the
-- caller retries (a new attempt, reserved anew). A newer attempt is not fenced.
-- Fences are a handful of rows (one per hold abandoned past its deadline) and are kept.

CREATE TABLE IF NOT EXISTS settle_fences (
    tenant      TEXT        NOT NULL,
    customer_id TEXT        NOT NULL,
    hold_id     TEXT        NOT NULL,
    nonce       TEXT        NOT NULL,
    attempt     BIGINT      NOT NULL,
    fenced_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, customer_id, hold_id, nonce)
);

-- Whether attempt p_attempt of hold (p_hold_id, p_nonce) was fenced. Call it only with the
-- customer row locked FOR UPDATE: the reaper writes fences under FOR SHARE of that row.
CREATE OR REPLACE FUNCTION beam_fenced(
    p_tenant TEXT, p_customer TEXT, p_hold_id TEXT, p_nonce TEXT, p_attempt BIGINT)
    RETURNS BOOLEAN LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM settle_fences
                    WHERE tenant = p_tenant AND customer_id = p_customer
                      AND hold_id = p_hold_id AND nonce = p_nonce AND attempt >= p_attempt)
$$;

-- beam_settle (0004) settles each item with beam_settle_one; an item that names its hold
-- ("fence": {"hold_id", "nonce", "attempt"}) is checked first. A replay of its own
-- settlement (same hold nonce) still answers: it adds nothing to the ledger.
ALTER FUNCTION beam_settle_one(JSONB) RENAME TO beam_settle_one_unfenced;

CREATE FUNCTION beam_settle_one(s JSONB) RETURNS JSONB
    LANGUAGE plpgsql AS $$
DECLARE
    v_tenant   TEXT := s->>'tenant';
    v_customer TEXT := s->>'customer_id';
BEGIN
    IF s ? 'fence' THEN
        PERFORM 1 FROM customers
          WHERE tenant = v_tenant AND customer_id = v_customer FOR UPDATE;
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
    RETURN beam_settle_one_unfenced(s);
END;
$$;
