-- DeductTokens: charge streamed tokens to a hold at its locked prices, growing the hold
-- from the available balance when the consumed cost passes it.
local now_ms       = tonumber(ARGV[1])
local hold_id      = ARGV[2]
local nonce        = ARGV[3]
local tokens       = tonumber(ARGV[4])
local token_kind   = ARGV[5]             -- 'in', 'out' or 'cached'
local sequence     = tonumber(ARGV[6])   -- 0 = none (not idempotent)
local model        = ARGV[7]
local has_prices   = ARGV[8]
local arg_p_in     = ARGV[9]
local arg_p_out    = ARGV[10]
local arg_p_cached = ARGV[11]
local expire_batch = tonumber(ARGV[12])
local max_tokens   = tonumber(ARGV[13])  -- per request
local ahead        = tonumber(ARGV[14])  -- completion tokens to reserve beyond these
local extra_in     = tonumber(ARGV[15])  -- prompt tokens charged with this deduct
local extra_cached = tonumber(ARGV[16])  -- cached prompt tokens charged with this deduct
-- Returns {outcome, code, available, consumed, amount, covered} where outcome is
--   'OK'   charged (code '')
--   'FAIL' the stream must stop: INSUFFICIENT_BALANCE, MAX_REQUEST_GRAINS_EXCEEDED or
--          HOLD_EXPIRED
--   'ERR'  a caller error: HOLD_NOT_FOUND, REQUEST_ALREADY_SETTLED, INVALID_REQUEST_TOKEN,
--          UNKNOWN_MODEL, TOKEN_LIMIT
-- and covered is the number of completion tokens the hold pays for in all at its locked
-- prices (0 without prices), or {'NOT_LOADED'}.
-- Reserve-ahead (a streaming guard): the hold grows to pay for `ahead` more completion
-- tokens too, so the stream may run ahead of the next answer; when it cannot, the answer is
-- FAIL INSUFFICIENT_BALANCE (or MAX_REQUEST_GRAINS_EXCEEDED) — stop now — and the hold
-- keeps what it could reserve, which covers the tokens in flight until the stop lands.
-- The cost is recomputed from the cumulative token counts (rounded up once), so splitting
-- a stream into more deducts never costs more. When the balance (or the customer's
-- per-request cap) cannot cover the tokens already delivered, the hold still grows by what
-- it can (those tokens cost money) and the answer tells the app to stop. Prices locked into
-- the hold win over the model named by a deduct; that model only prices a hold opened
-- without one.
-- Sequence numbers: a retry of one of the last SEQUENCE_WINDOW sequence numbers answers its
-- stored result without charging again; an older one is answered as a duplicate (no
-- charge). So a hold keeps at most SEQUENCE_WINDOW results, however long the stream.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end
expire_due(now_ms, expire_batch)

local balance, held, _, _, max_request = account()
local h = redis.call('HMGET', KEYS[4], 'nonce', 'status', 'amount', 'consumed', 'kind',
  'has_prices', 'p_in', 'p_out', 'p_cached', 'in_tokens', 'out_tokens', 'cached_tokens',
  'ttl_ms', 'max_seq')
if h[2] == false or (h[5] or 'request') ~= 'request' then
  if h[2] or redis.call('EXISTS', KEYS[5]) == 1 then
    return {'ERR', 'REQUEST_ALREADY_SETTLED', balance - held, 0, 0}
  end
  return {'ERR', 'HOLD_NOT_FOUND', balance - held, 0, 0}
end
if h[1] ~= nonce then
  return {'ERR', 'INVALID_REQUEST_TOKEN', balance - held, 0, 0}
end
local amount, consumed = num(h[3]), num(h[4])
local function covered_now()
  if h[6] ~= '1' then
    return 0
  end
  return covered_out(amount, num(h[10]), num(h[12]), num(h[7]), num(h[8]), num(h[9]),
    max_tokens)
end
if h[2] == 'settling' then
  return {'ERR', 'REQUEST_ALREADY_SETTLED', balance - held, consumed, amount}
end
local max_seq = num(h[14])
if sequence > 0 then
  local seen = redis.call('HGET', KEYS[4], 's:' .. fmt(sequence))
  if seen then
    local outcome, code = string.match(seen, '^(%u+)|([%u_]*)$')
    return {outcome, code, balance - held, consumed, amount, covered_now()}
  end
  if sequence <= max_seq - SEQUENCE_WINDOW then
    return {'OK', '', balance - held, consumed, amount, covered_now()}
  end
end
if h[2] ~= 'open' then
  return {'FAIL', 'HOLD_EXPIRED', balance - held, consumed, amount, covered_now()}
end
local p_in, p_out, p_cached = num(h[7]), num(h[8]), num(h[9])
local lock_prices = false
if h[6] ~= '1' then
  if has_prices ~= '1' then
    return {'ERR', 'UNKNOWN_MODEL', balance - held, consumed, amount}
  end
  p_in, p_out, p_cached = tonumber(arg_p_in), tonumber(arg_p_out), tonumber(arg_p_cached)
  lock_prices = true
end

local in_tokens, out_tokens, cached_tokens = num(h[10]), num(h[11]), num(h[12])
if token_kind == 'out' then
  out_tokens = out_tokens + tokens
elseif token_kind == 'cached' then
  cached_tokens = cached_tokens + tokens
else
  in_tokens = in_tokens + tokens
end
in_tokens = in_tokens + extra_in
cached_tokens = cached_tokens + extra_cached
if in_tokens + out_tokens + cached_tokens > max_tokens then
  return {'ERR', 'TOKEN_LIMIT', balance - held, consumed, amount}
end

local cost = token_cost(in_tokens, out_tokens, cached_tokens, p_in, p_out, p_cached)
local target = cost
if ahead > 0 then
  target = token_cost(in_tokens, out_tokens + ahead, cached_tokens, p_in, p_out, p_cached)
end
local outcome, code = 'OK', ''
if target > amount then
  local grow = target - amount
  if max_request > 0 and amount + grow > max_request then
    grow = math.max(max_request - amount, 0)
    outcome, code = 'FAIL', 'MAX_REQUEST_GRAINS_EXCEEDED'
  end
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

local expires_at = now_ms + num(h[13])
if amount ~= num(h[3]) then
  holds_changed()
end
redis.call('HSET', KEYS[1], 'held', fmt(held))
redis.call('HSET', KEYS[4], 'amount', fmt(amount), 'consumed', fmt(consumed),
  'in_tokens', fmt(in_tokens), 'out_tokens', fmt(out_tokens),
  'cached_tokens', fmt(cached_tokens))
if lock_prices then
  redis.call('HSET', KEYS[4], 'has_prices', '1', 'model', model, 'p_in', arg_p_in,
    'p_out', arg_p_out, 'p_cached', arg_p_cached)
end
if sequence > 0 then
  redis.call('HSET', KEYS[4], 's:' .. fmt(sequence), outcome .. '|' .. code)
  if sequence > max_seq then
    -- Forget results that fell out of the window (at most SEQUENCE_WINDOW fields).
    local first = math.max(1, max_seq - SEQUENCE_WINDOW + 1)
    local last = math.min(max_seq, sequence - SEQUENCE_WINDOW)
    for s = first, last do
      redis.call('HDEL', KEYS[4], 's:' .. fmt(s))
    end
    redis.call('HSET', KEYS[4], 'max_seq', fmt(sequence))
  end
end
redis.call('ZADD', KEYS[2], fmt(expires_at), hold_id)
return {outcome, code, balance - held, consumed, amount,
  covered_out(amount, in_tokens, cached_tokens, p_in, p_out, p_cached, max_tokens)}
