-- verify-integrity: the account as Redis sees it and the holds it is made of.
--
-- Returns {exists(0|1), balance, held, version, sum_of_hold_amounts, open_count,
--          expiring_count}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0, 0, 0, 0, 0}
end
local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'version')
local total = 0
local prefix = key_prefix()
for _, set in ipairs({KEYS[2], KEYS[3]}) do
  for _, rid in ipairs(redis.call('ZRANGE', set, 0, -1)) do
    total = total + num(redis.call('HGET', prefix .. 'h:' .. rid, 'amount'))
  end
end
return {1, num(f[1]), num(f[2]), num(f[3]), total, redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3])}
