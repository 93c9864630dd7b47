-- Reaper: a settling hold whose commit never came by its deadline (the process died
-- before committing, and nobody retried). Nothing was committed for it (the reaper looked
-- in PostgreSQL first), so:
--   a request hold goes back to what a hold that expired unsettled is: shrunk to what it
--     consumed, in the expiring set, to be recorded as an expiry;
--   a claim or a debit hold had nothing delivered through it and is released.
-- The reaper fenced attempts up to `attempt` in PostgreSQL first: a commit of any of them
-- that had not landed by then never will. A newer attempt (a Finalize that took the hold
-- over since) is left alone: it is not fenced, and it reserves what it may commit.
local hold_id = ARGV[1]
local nonce   = ARGV[2]
local now_ms  = tonumber(ARGV[3])
local attempt = tonumber(ARGV[4])
-- Returns {'EXPIRING'|'RELEASED'|'GONE'}.
local h = redis.call('HMGET', KEYS[4], 'nonce', 'status', 'kind', 'amount', 'consumed',
  'attempt')
if h[1] ~= nonce or h[2] ~= 'settling' or num(h[6]) ~= attempt then
  return {'GONE'}
end
local held = num(redis.call('HGET', KEYS[1], 'held'))
local amount, consumed = num(h[4]), num(h[5])
if (h[3] or 'request') == 'request' then
  invariant(consumed <= amount, 'consumed > amount')
  holds_changed()
  redis.call('HSET', KEYS[4], 'status', 'expiring', 'amount', fmt(consumed),
    'expired_at', fmt(now_ms))
  redis.call('ZREM', KEYS[6], hold_id)
  redis.call('ZADD', KEYS[3], fmt(now_ms), hold_id)
  if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HSET', KEYS[1], 'held', fmt(held - (amount - consumed)))
  end
  return {'EXPIRING'}
end
drop_hold(hold_id)
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'held', fmt(held - amount))
end
return {'RELEASED'}
