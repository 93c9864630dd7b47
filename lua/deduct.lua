-- DeductTokens: charge streamed tokens to a hold at its locked prices, growing the hold
-- from the available balance when the consumed cost passes it.
--
-- ARGV: 1 now_ms, 2 request_id, 3 nonce, 4 tokens, 5 kind (in|out|cached),
--       6 sequence (0 = none), 7 model, 8 has_prices (0|1), 9 p_in, 10 p_out,
--       11 p_cached, 12 expire_batch, 13 max_tokens_per_request
-- Returns {outcome, code, available, consumed, amount} where outcome is
--   'OK'   charged (code '')
--   'FAIL' the stream must stop: INSUFFICIENT_BALANCE or HOLD_EXPIRED
--   'ERR'  a caller error: HOLD_NOT_FOUND, REQUEST_ALREADY_SETTLED, INVALID_REQUEST_TOKEN,
--          UNKNOWN_MODEL, TOKEN_LIMIT
-- or {'NOT_LOADED'}.
-- The cost is recomputed from the cumulative token counts (rounded up once), so splitting
-- a stream into more deducts never costs more. When the balance cannot cover the tokens
-- already delivered, the hold still grows by whatever is available (those tokens cost
-- money) and the answer tells the app to stop. Prices locked into the hold win over the
-- model named by a deduct; that model only prices a hold opened without one. A sequence number makes a retry answer
-- the stored result without charging again.
local now_ms = tonumber(ARGV[1])
local tokens = tonumber(ARGV[4])
local kind = ARGV[5]
local sequence = ARGV[6]

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end
expire_due(now_ms, tonumber(ARGV[12]))

local balance, held = account()
if redis.call('EXISTS', KEYS[4]) == 0 then
  if redis.call('EXISTS', KEYS[5]) == 1 then
    return {'ERR', 'REQUEST_ALREADY_SETTLED', balance - held, 0, 0}
  end
  return {'ERR', 'HOLD_NOT_FOUND', balance - held, 0, 0}
end

local h = redis.call('HMGET', KEYS[4], 'nonce', 'status', 'amount', 'consumed', 'model',
  'has_prices', 'p_in', 'p_out', 'p_cached', 'in_tokens', 'out_tokens', 'cached_tokens',
  'ttl_ms')
if h[1] ~= ARGV[3] then
  return {'ERR', 'INVALID_REQUEST_TOKEN', balance - held, 0, 0}
end
local amount, consumed = num(h[3]), num(h[4])
if sequence ~= '0' then
  local seen = redis.call('HGET', KEYS[4], 's:' .. sequence)
  if seen then
    local outcome, code = string.match(seen, '^(%u+)|([%u_]*)$')
    return {outcome, code, balance - held, consumed, amount}
  end
end
if h[2] ~= 'open' then
  return {'FAIL', 'HOLD_EXPIRED', balance - held, consumed, amount}
end
local p_in, p_out, p_cached = num(h[7]), num(h[8]), num(h[9])
local lock_prices = false
if h[6] ~= '1' then
  if ARGV[8] ~= '1' then
    return {'ERR', 'UNKNOWN_MODEL', balance - held, consumed, amount}
  end
  p_in, p_out, p_cached = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
  lock_prices = true
end

local in_tokens, out_tokens, cached_tokens = num(h[10]), num(h[11]), num(h[12])
if kind == 'out' then
  out_tokens = out_tokens + tokens
elseif kind == 'cached' then
  cached_tokens = cached_tokens + tokens
else
  in_tokens = in_tokens + tokens
end
if in_tokens + out_tokens + cached_tokens > tonumber(ARGV[13]) then
  return {'ERR', 'TOKEN_LIMIT', balance - held, consumed, amount}
end

local cost = token_cost(in_tokens, out_tokens, cached_tokens, p_in, p_out, p_cached)
local outcome, code = 'OK', ''
if cost > amount then
  local grow = cost - amount
  local available = balance - held
  if grow > available then
    grow = math.max(available, 0)
    outcome, code = 'FAIL', 'INSUFFICIENT_BALANCE'
  end
  amount = amount + grow
  held = held + grow
  -- Holds only ever grow into available money (an overage may already have pushed the
  -- balance below the other holds; then grow is 0).
  invariant(grow == 0 or held <= balance, 'held > balance after growing a hold')
end
consumed = math.min(cost, amount)

local ttl_ms = num(h[13])
local expires_at = now_ms + ttl_ms
redis.call('HSET', KEYS[1], 'held', fmt(held))
redis.call('HSET', KEYS[4], 'amount', fmt(amount), 'consumed', fmt(consumed),
  'in_tokens', fmt(in_tokens), 'out_tokens', fmt(out_tokens),
  'cached_tokens', fmt(cached_tokens))
if lock_prices then
  redis.call('HSET', KEYS[4], 'has_prices', '1', 'model', ARGV[7], 'p_in', ARGV[9],
    'p_out', ARGV[10], 'p_cached', ARGV[11])
end
if sequence ~= '0' then
  redis.call('HSET', KEYS[4], 's:' .. sequence, outcome .. '|' .. code)
end
redis.call('ZADD', KEYS[2], fmt(expires_at), ARGV[2])
return {outcome, code, balance - held, consumed, amount}
