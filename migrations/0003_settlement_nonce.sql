-- Which hold a settlement settled (its nonce; '' for a Finalize with no hold), so a later
-- hold opened under the same request id is never released or answered by this settlement,
-- and which Redis server the accounts were last synced against (see docs/ARCHITECTURE.md,
-- "Redis restarts"): a start-up that finds another server resyncs every account, even when
-- every replica restarted together and none saw the change.
ALTER TABLE requests ADD COLUMN IF NOT EXISTS hold_nonce TEXT NOT NULL DEFAULT '';

CREATE TABLE IF NOT EXISTS beam_state (
    name       TEXT        PRIMARY KEY,
    value      TEXT        NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
