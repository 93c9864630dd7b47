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
-- Shorten rather than refuse (a Check with min_completion_tokens): the estimate is the
-- cost of in_tokens + cached_tokens + max_out completion tokens at p_in/p_out/p_cached;
-- when its hold is more than the account can give, the hold is sized for the most
-- completion tokens in [min_out, max_out] it can give. min_out 0: no shortening.
local in_tokens      = tonumber(ARGV[17])
local cached_tokens  = tonumber(ARGV[18])
local min_out        = tonumber(ARGV[19])
local max_out        = tonumber(ARGV[20])
-- The hold is ceil(estimated x multiplier_ppm / 1e6), computed exactly in integers.
-- Returns one of
--   {'OK', amount, remaining, nonce, expires_at_ms, replayed(0|1), granted_out}
--     (granted_out: the completion tokens the hold was sized for; max_out unless shortened)
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
  'status', 'kind', 'granted0')
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
  return {'OK', num(h[2]), num(h[3]), h[4], num(h[5]), 1, num(h[8])}
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
local amount = hold_for(estimated, multiplier_ppm)
local granted = max_out
if min_out > 0 and kind == 'request' and state == 'active' then
  local limit = available
  if max_request > 0 and max_request < limit then
    limit = max_request
  end
  if amount > limit then
    -- The largest t in [min_out, max_out) whose hold fits (max_out does not); bounded: 32
    -- halvings of a range of at most 2^31 tokens. Unaffordable even at min_out: refused
    -- below, by the usual checks, with the hold for min_out.
    local function estimate_for(t)
      return math.max(token_cost(in_tokens, t, cached_tokens, tonumber(p_in), tonumber(p_out),
        tonumber(p_cached)), 1)
    end
    local lo, hi = min_out, max_out
    if hold_for(estimate_for(lo), multiplier_ppm) > limit then
      hi = lo
    end
    for _ = 1, 32 do
      if hi - lo <= 1 then
        break
      end
      local mid = math.floor((lo + hi) / 2)
      if hold_for(estimate_for(mid), multiplier_ppm) <= limit then
        lo = mid
      else
        hi = mid
      end
    end
    granted = lo
    estimated = estimate_for(lo)
    amount = hold_for(estimated, multiplier_ppm)
  end
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
holds_changed()
redis.call('HSET', KEYS[1], 'held', fmt(held))
redis.call('HSET', KEYS[4],
  'status', status, 'kind', kind, 'amount', fmt(amount), 'consumed', '0',
  'in_tokens', '0', 'out_tokens', '0', 'cached_tokens', '0', 'max_seq', '0',
  'estimated', fmt(estimated), 'fp', fingerprint, 'nonce', nonce, 'model', model,
  'has_prices', has_prices, 'p_in', p_in, 'p_out', p_out, 'p_cached', p_cached,
  'ttl_ms', fmt(ttl_ms), 'created', fmt(now_ms), 'marked', fmt(now_ms),
  'amount0', fmt(amount), 'remaining0', fmt(remaining), 'exp0', fmt(expires_at),
  'granted0', fmt(granted))
if kind == 'debit' then
  redis.call('ZADD', KEYS[6], fmt(expires_at), hold_id)
else
  redis.call('ZADD', KEYS[2], fmt(expires_at), hold_id)
end
return {'OK', amount, remaining, nonce, expires_at, 0, granted}
