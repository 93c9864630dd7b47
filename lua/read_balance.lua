-- GetBalance: balance and held, after expiring overdue holds (so abandoned holds stop
-- blocking the customer even before the reaper runs).
local now_ms       = tonumber(ARGV[1])
local expire_batch = tonumber(ARGV[2])
-- Returns {1, balance, held, version} or {'NOT_LOADED'}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end
expire_due(now_ms, expire_batch)
local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'version')
return {1, num(f[1]), num(f[2]), num(f[3])}
