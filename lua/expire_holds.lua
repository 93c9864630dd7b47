-- Reaper: expire overdue holds of one customer and list those awaiting settlement.
--
-- ARGV: 1 now_ms, 2 limit
-- Returns a flat list, 11 fields per expiring hold:
--   request_id, amount, consumed, in_tokens, out_tokens, cached_tokens, model,
--   estimated, created_ms, has_prices, fingerprint
-- Settlement happens in PostgreSQL first, then settle_hold releases each one.
local now_ms = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  expire_due(now_ms, limit)
end
local out = {}
local prefix = key_prefix()
for _, rid in ipairs(redis.call('ZRANGE', KEYS[3], 0, limit - 1)) do
  local h = redis.call('HMGET', prefix .. 'h:' .. rid, 'amount', 'consumed', 'in_tokens',
    'out_tokens', 'cached_tokens', 'model', 'estimated', 'created', 'has_prices', 'fp')
  if h[1] == false then
    -- Released by a concurrent settlement; nothing left to do for this one.
    redis.call('ZREM', KEYS[3], rid)
  else
    table.insert(out, rid)
    for i = 1, 10 do
      table.insert(out, h[i] or '')
    end
  end
end
return out
