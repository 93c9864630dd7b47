-- After a credit committed in PostgreSQL: adopt its balance if it is newer.
local balance = ARGV[1]
local version = tonumber(ARGV[2])
-- Returns {applied(0|1), balance, held}; {0, 0, 0} for an account not loaded (it will be
-- loaded from PostgreSQL, already up to date, on first use).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0}
end
local f = redis.call('HMGET', KEYS[1], 'version', 'balance', 'held')
if version > num(f[1]) then
  redis.call('HSET', KEYS[1], 'balance', balance, 'version', fmt(version))
  return {1, tonumber(balance), num(f[3])}
end
return {0, num(f[2]), num(f[3])}
