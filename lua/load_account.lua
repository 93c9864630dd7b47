-- Load (or re-sync) one account from PostgreSQL without dropping open holds.
--
-- ARGV: 1 balance, 2 version, 3 state (active|suspended|closed), 4 ttl_ms (0 = default),
--       5 max_request_grains (0 = none), 6 force (1: adopt the balance even if Redis has a
--       newer version, and recompute held from the holds; used by sync),
--       7 buffer_ppm (the buffer strategy's multiplier in parts per million)
-- `held` is always re-derived from the holds when the account is created or forced, so a
-- lost account hash cannot leak or forget held money. Bounded: at most max-open-holds
-- holds exist per customer.
-- Returns {balance, held, version}.
local exists = redis.call('EXISTS', KEYS[1]) == 1
local force = ARGV[6] == '1'
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'ttl_ms', ARGV[4],
  'max_request_grains', ARGV[5], 'buffer_ppm', ARGV[7])
local version = num(redis.call('HGET', KEYS[1], 'version'))
if not exists or force or tonumber(ARGV[2]) > version then
  redis.call('HSET', KEYS[1], 'balance', ARGV[1], 'version', ARGV[2])
end
if not exists or force then
  local held = 0
  local prefix = key_prefix()
  for _, set in ipairs({KEYS[2], KEYS[3]}) do
    for _, rid in ipairs(redis.call('ZRANGE', set, 0, -1)) do
      held = held + num(redis.call('HGET', prefix .. 'h:' .. rid, 'amount'))
    end
  end
  redis.call('HSET', KEYS[1], 'held', fmt(held))
end
local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'version')
return {num(f[1]), num(f[2]), num(f[3])}
