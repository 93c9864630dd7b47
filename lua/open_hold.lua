-- CheckBalance (and an admin debit): open a hold if the available balance covers it.
local now_ms         = tonumber(ARGV[1])
local hold_id        = ARGV[2]
local estimated      = tonumber(ARGV[3])
local multiplier_ppm = tonumber(ARGV[4])  -- 0 = the account's buffer strategy
local fingerprint    = ARGV[5]
local nonce          = ARGV[6]
local model          = ARGV[7]
local has_prices     = ARGV[8]            -- '1' when p_in/p_out/p_cached are given
local p_in           = ARGV[9]
local p_out          = ARGV[10]
local p_cached       = ARGV[11]
local default_ttl_ms = tonumber(ARGV[12])
local max_open_holds = tonumber(ARGV[13])
local expire_batch   = tonumber(ARGV[14])
local kind           = ARGV[15]           -- 'request' (Check) or 'debit'
local settle_ttl_ms  = tonumber(ARGV[16]) -- a debit hold opens settling, with this deadline
-- The hold is ceil(estimated x multiplier_ppm / 1e6), computed exactly in integers.
-- Returns one of
--   {'OK', amount, remaining, nonce, expires_at_ms, replayed(0|1)}
--   {'REJECT', reason, available}
--   {'CONFLICT'}    same hold id, different parameters
--   {'SETTLED'}     the request id is settled, or its settlement is being committed
--   {'NOT_LOADED'}  the account is not in Redis yet (the caller loads it, retries once)
-- A retry with the same fingerprint while the hold is open (a debit: still settling)
-- answers with the original result; nothing is written twice. A settled request id never
-- opens a new hold while its done marker lives; once the marker is gone, the caller asks
-- PostgreSQL (the authority) and voids a hold opened for a settled id.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end

local h = redis.call('HMGET', KEYS[4], 'fp', 'amount0', 'remaining0', 'nonce', 'exp0',
  'status', 'kind')
if h[6] then
  local hold_kind = h[7] or 'request'  -- holds opened before kinds existed are requests
  local replayable = (kind == 'debit' and hold_kind == 'debit') or
    (kind == 'request' and hold_kind == 'request' and h[6] ~= 'settling')
  if not replayable then
    return {'SETTLED'}  -- being settled (a Finalize, a claim): never a new hold
  end
  if h[1] ~= fingerprint then
    return {'CONFLICT'}
  end
  redis.call('HINCRBY', KEYS[4], 'replays', 1)  -- its token is now out there twice
  return {'OK', num(h[2]), num(h[3]), h[4], num(h[5]), 1}
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {'SETTLED'}
end

expire_due(now_ms, expire_batch)

local balance, held, state, ttl_ms, max_request = account()
local available = balance - held
if multiplier_ppm <= 0 then
  multiplier_ppm = num(redis.call('HGET', KEYS[1], 'buffer_ppm'))
end
invariant(multiplier_ppm >= MILLION, 'buffer multiplier below 1')
-- estimated = q * 1e6 + r: q * ppm is exact while it is below 2^53; above that no balance
-- could cover the hold anyway.
local q, r = split_price(estimated)
local amount = q * multiplier_ppm
local frac = r * multiplier_ppm
local rest = math.fmod(frac, MILLION)
amount = amount + (frac - rest) / MILLION
if rest > 0 then
  amount = amount + 1
end
if amount > MAX_GRAINS then
  return {'REJECT', 'INSUFFICIENT_BALANCE', available}
end
if state == 'suspended' then
  return {'REJECT', 'CUSTOMER_SUSPENDED', available}
elseif state == 'closed' then
  return {'REJECT', 'CUSTOMER_CLOSED', available}
end
if kind == 'request' and max_request > 0 and amount > max_request then
  return {'REJECT', 'MAX_REQUEST_GRAINS_EXCEEDED', available}
end
if amount > available then
  return {'REJECT', 'INSUFFICIENT_BALANCE', available}
end
local holds = redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3]) +
  redis.call('ZCARD', KEYS[6])
if holds >= max_open_holds then
  return {'REJECT', 'TOO_MANY_OPEN_HOLDS', available}
end
if ttl_ms <= 0 then
  ttl_ms = default_ttl_ms
end

held = held + amount
invariant(held <= balance, 'held > balance after open')
local expires_at = now_ms + ttl_ms
local status = 'open'
if kind == 'debit' then
  status = 'settling'
  expires_at = now_ms + settle_ttl_ms
end
local remaining = balance - held
redis.call('HSET', KEYS[1], 'held', fmt(held))
redis.call('HSET', KEYS[4],
  'status', status, 'kind', kind, 'amount', fmt(amount), 'consumed', '0',
  'in_tokens', '0', 'out_tokens', '0', 'cached_tokens', '0', 'max_seq', '0',
  'estimated', fmt(estimated), 'fp', fingerprint, 'nonce', nonce, 'model', model,
  'has_prices', has_prices, 'p_in', p_in, 'p_out', p_out, 'p_cached', p_cached,
  'ttl_ms', fmt(ttl_ms), 'created', fmt(now_ms), 'marked', fmt(now_ms),
  'amount0', fmt(amount), 'remaining0', fmt(remaining), 'exp0', fmt(expires_at))
if kind == 'debit' then
  redis.call('ZADD', KEYS[6], fmt(expires_at), hold_id)
else
  redis.call('ZADD', KEYS[2], fmt(expires_at), hold_id)
end
return {'OK', amount, remaining, nonce, expires_at, 0}
