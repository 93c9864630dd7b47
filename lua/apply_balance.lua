-- After a credit, debit or adjustment committed in PostgreSQL: adopt its balance if newer.
--
-- ARGV: 1 balance, 2 version
-- Returns {applied(0|1), balance, held}; {0, 0, 0} for an account not loaded (it will be
-- loaded from PostgreSQL, already up to date, on first use).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0}
end
local f = redis.call('HMGET', KEYS[1], 'version', 'balance', 'held')
if tonumber(ARGV[2]) > num(f[1]) then
  redis.call('HSET', KEYS[1], 'balance', ARGV[1], 'version', ARGV[2])
  return {1, tonumber(ARGV[1]), num(f[3])}
end
return {0, num(f[2]), num(f[3])}
