-- A credit about to commit: a settling hold of 0 grains under '#credit:<transaction id>',
-- so that if the process dies between the commit and the Redis update, the reaper finds
-- it and lets Redis adopt the ledger's balance (Ledger.complete_settling). It reserves
-- nothing: a credit only adds money.
local now_ms      = tonumber(ARGV[1])
local hold_id     = ARGV[2]
local nonce       = ARGV[3]
local kind        = ARGV[4]
local deadline_ms = tonumber(ARGV[5])
-- Returns {'OK', nonce} (the nonce of the pending hold: a retry reuses the first one) or
-- {'NOT_LOADED'} (the account is not in Redis: it will be loaded from the ledger, already
-- up to date, so there is nothing to protect).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end
local existing = redis.call('HGET', KEYS[4], 'nonce')
if existing then
  return {'OK', existing}
end
holds_changed()
redis.call('HSET', KEYS[4], 'status', 'settling', 'kind', kind, 'amount', '0',
  'consumed', '0', 'nonce', nonce, 'created', fmt(now_ms), 'marked', fmt(now_ms))
redis.call('ZADD', KEYS[6], fmt(deadline_ms), hold_id)
return {'OK', nonce}
