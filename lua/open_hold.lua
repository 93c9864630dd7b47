-- CheckBalance: open a hold of ARGV amount if the customer's available balance covers it.
--
-- ARGV: 1 now_ms, 2 request_id, 3 estimated, 4 multiplier_ppm (0 = the account's buffer
--       strategy), 5 fingerprint, 6 nonce, 7 model, 8 has_prices (0|1), 9 p_in, 10 p_out,
--       11 p_cached, 12 default_ttl_ms, 13 max_open_holds, 14 expire_batch
-- The hold is ceil(estimated x multiplier_ppm / 1e6), computed exactly in integers.
-- Returns one of
--   {'OK', amount, remaining, nonce, expires_at_ms, replayed(0|1)}
--   {'REJECT', reason, available}
--   {'CONFLICT'}            same request id, different parameters
--   {'SETTLED'}             the request id was already settled by another path
--   {'NOT_LOADED'}          the account is not in Redis yet (caller loads it, retries once)
-- Idempotent by request id: an open hold or a recent settlement with the same fingerprint
-- answers with the original result; nothing is written twice.
local now_ms = tonumber(ARGV[1])
local estimated = tonumber(ARGV[3])
local multiplier_ppm = tonumber(ARGV[4])
local fingerprint = ARGV[5]

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end

local function replay(key)
  local f = redis.call('HMGET', key, 'fp', 'amount0', 'remaining0', 'nonce', 'exp0')
  if f[1] == false then
    return nil
  end
  if f[1] ~= fingerprint then
    return {'CONFLICT'}
  end
  return {'OK', num(f[2]), num(f[3]), f[4], num(f[5]), 1}
end

local answer = replay(KEYS[4]) or replay(KEYS[5])
if answer then
  return answer
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  -- Settled without a hold of this Check (e.g. a Finalize that reached the ledger first).
  return {'SETTLED'}
end

expire_due(now_ms, tonumber(ARGV[14]))

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
if max_request > 0 and amount > max_request then
  return {'REJECT', 'MAX_REQUEST_GRAINS_EXCEEDED', available}
end
if amount > available then
  return {'REJECT', 'INSUFFICIENT_BALANCE', available}
end
if redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[13]) then
  return {'REJECT', 'TOO_MANY_OPEN_HOLDS', available}
end
if ttl_ms <= 0 then
  ttl_ms = tonumber(ARGV[12])
end

held = held + amount
invariant(held <= balance, 'held > balance after open')
local expires_at = now_ms + ttl_ms
local remaining = balance - held
redis.call('HSET', KEYS[1], 'held', fmt(held))
redis.call('HSET', KEYS[4],
  'status', 'open', 'amount', fmt(amount), 'consumed', '0',
  'in_tokens', '0', 'out_tokens', '0', 'cached_tokens', '0',
  'estimated', ARGV[3], 'fp', fingerprint, 'nonce', ARGV[6], 'model', ARGV[7],
  'has_prices', ARGV[8], 'p_in', ARGV[9], 'p_out', ARGV[10], 'p_cached', ARGV[11],
  'ttl_ms', fmt(ttl_ms), 'created', ARGV[1],
  'amount0', fmt(amount), 'remaining0', fmt(remaining), 'exp0', fmt(expires_at))
redis.call('ZADD', KEYS[2], fmt(expires_at), ARGV[2])
return {'OK', amount, remaining, ARGV[6], expires_at, 0}
