-- verify-integrity: the account as Redis sees it and the holds it is made of. No ARGV.
-- Returns {exists(0|1), balance, held, version, sum_of_hold_amounts, open_count,
--          expiring_count, settling_count}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0, 0, 0, 0, 0, 0}
end
local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'version')
return {1, num(f[1]), num(f[2]), num(f[3]), sum_of_holds(), redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3]), redis.call('ZCARD', KEYS[6])}
