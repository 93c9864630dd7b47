-- GetBalance: balance and held, after expiring overdue holds (so abandoned holds stop
-- blocking the customer even before the reaper runs).
--
-- ARGV: 1 now_ms, 2 expire_batch
-- Returns {1, balance, held, version} or {'NOT_LOADED'}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end
expire_due(tonumber(ARGV[1]), tonumber(ARGV[2]))
local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'version')
return {1, num(f[1]), num(f[2]), num(f[3])}
