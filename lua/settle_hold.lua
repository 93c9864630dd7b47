-- FinalizeRequest / expiry, last step (after PostgreSQL committed the settlement): release
-- the hold, adopt PostgreSQL's balance if it is newer, and keep a marker of the settlement
-- (with the hold's original Check answer) for retries of Check and Finalize.
--
-- ARGV: 1 request_id, 2 balance_after, 3 balance_version, 4 charged, 5 refunded,
--       6 overage, 7 status, 8 done_ttl_seconds
-- Returns {released, held, balance}. Safe to run twice: the second run releases nothing
-- and a stale balance version is ignored.
local released = 0
local held = num(redis.call('HGET', KEYS[1], 'held'))
local original = {}
if redis.call('EXISTS', KEYS[4]) == 1 then
  local h = redis.call('HMGET', KEYS[4], 'amount', 'fp', 'amount0', 'remaining0', 'nonce',
    'exp0')
  released = num(h[1])
  invariant(released <= held, 'hold larger than held')
  held = held - released
  original = {'fp', h[2], 'amount0', h[3], 'remaining0', h[4], 'nonce', h[5], 'exp0', h[6]}
  redis.call('DEL', KEYS[4])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
local balance = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'held', fmt(held))
  local version = num(redis.call('HGET', KEYS[1], 'version'))
  if tonumber(ARGV[3]) > version then
    redis.call('HSET', KEYS[1], 'balance', ARGV[2], 'version', ARGV[3])
  end
  balance = num(redis.call('HGET', KEYS[1], 'balance'))
end
redis.call('HSET', KEYS[5], 'charged', ARGV[4], 'refunded', ARGV[5],
  'final_balance', ARGV[2], 'overage', ARGV[6], 'status', ARGV[7], unpack(original))
redis.call('EXPIRE', KEYS[5], ARGV[8])
return {released, held, balance}
