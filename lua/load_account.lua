-- Load (or re-sync) one account from PostgreSQL without dropping holds.
local balance            = ARGV[1]
local version            = tonumber(ARGV[2])
local state              = ARGV[3]  -- active | suspended | closed
local ttl_ms             = ARGV[4]  -- 0 = the service default
local max_request_grains = ARGV[5]  -- 0 = no cap
local force              = ARGV[6] == '1'  -- sync: adopt even an older version, re-derive held
local buffer_ppm         = ARGV[7]  -- the buffer strategy's multiplier, parts per million
-- `held` is always re-derived from the holds when the account is created or forced, so a
-- lost account hash cannot leak or forget held money. Bounded: at most max-open-holds
-- holds exist per customer.
-- Returns {balance, held, version}.
local exists = redis.call('EXISTS', KEYS[1]) == 1
redis.call('HSET', KEYS[1], 'state', state, 'ttl_ms', ttl_ms,
  'max_request_grains', max_request_grains, 'buffer_ppm', buffer_ppm)
local current = num(redis.call('HGET', KEYS[1], 'version'))
if not exists or force or version > current then
  redis.call('HSET', KEYS[1], 'balance', balance, 'version', fmt(version))
end
if not exists or force then
  redis.call('HSET', KEYS[1], 'held', fmt(sum_of_holds()))
end
local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'version')
return {num(f[1]), num(f[2]), num(f[3])}
