-- FinalizeRequest, step 1: read what the settlement needs, in one round trip.
--
-- ARGV: 1 now_ms, 2 expire_batch
-- Returns one of
--   {'DONE', charged, refunded, final_balance, overage, status}   already settled
--   {'HOLD', balance, held, amount, consumed, in_tokens, out_tokens, cached_tokens,
--    has_prices, p_in, p_out, p_cached, model, nonce, estimated, status, created_ms}
--   {'NONE', balance, held}                                        no hold known
--   {'NOT_LOADED'}
local now_ms = tonumber(ARGV[1])
local d = redis.call('HMGET', KEYS[5], 'charged', 'refunded', 'final_balance', 'overage',
  'status')
if d[1] then
  return {'DONE', num(d[1]), num(d[2]), num(d[3]), num(d[4]), d[5]}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end
expire_due(now_ms, tonumber(ARGV[2]))
local balance, held = account()
local h = redis.call('HMGET', KEYS[4], 'amount', 'consumed', 'in_tokens', 'out_tokens',
  'cached_tokens', 'has_prices', 'p_in', 'p_out', 'p_cached', 'model', 'nonce',
  'estimated', 'status', 'created')
if h[1] == false then
  return {'NONE', balance, held}
end
return {'HOLD', balance, held, num(h[1]), num(h[2]), num(h[3]), num(h[4]), num(h[5]),
  num(h[6]), num(h[7]), num(h[8]), num(h[9]), h[10], h[11], num(h[12]), h[13], num(h[14])}
