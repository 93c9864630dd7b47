-- Shared prelude of every Beam script; the loader prepends it (beam.adapters.redis_store).
--
-- KEYS (beam.constants.customer_keys), all under one hash tag {tenant:customer}:
--   KEYS[1] account hash   balance, version, held, state, ttl_ms, max_request_grains
--   KEYS[2] open holds     zset: request id -> expiry (unix ms)
--   KEYS[3] expiring holds zset: request id -> time it expired; awaiting settlement
--   KEYS[4] hold hash      amount, consumed, tokens, locked prices, nonce, fingerprint, ...
--   KEYS[5] done marker    hash with the settlement, kept for retries (has a TTL)
-- Per-hold keys of other requests are derived from KEYS[1]'s prefix: same tag, same slot.
--
-- Numbers: Lua 5.1 numbers are doubles; every amount is bounded by 2^53-1 (exact).
-- Numbers are written back with fmt() so Redis never stores an exponent form.

local MILLION = 1000000
local MAX_GRAINS = 9007199254740991

local function fmt(n)
  return string.format('%d', n)
end

local function num(v)
  if v == false or v == nil then
    return 0
  end
  return tonumber(v)
end

local function key_prefix()
  -- "beam:{t:c}:acct" -> "beam:{t:c}:"
  return string.sub(KEYS[1], 1, #KEYS[1] - 4)
end

local function split_price(price)
  local rest = math.fmod(price, MILLION)
  return (price - rest) / MILLION, rest
end

-- ceil((in*p_in + out*p_out + cached*p_cached) / 1e6), exact for tokens <= 1e9 and
-- prices <= 1e12 per million: whole and fractional parts are summed separately.
local function token_cost(in_tokens, out_tokens, cached_tokens, p_in, p_out, p_cached)
  local q_in, r_in = split_price(p_in)
  local q_out, r_out = split_price(p_out)
  local q_cached, r_cached = split_price(p_cached)
  local whole = q_in * in_tokens + q_out * out_tokens + q_cached * cached_tokens
  local frac = r_in * in_tokens + r_out * out_tokens + r_cached * cached_tokens
  local rest = math.fmod(frac, MILLION)
  whole = whole + (frac - rest) / MILLION
  if rest > 0 then
    whole = whole + 1
  end
  return whole
end

local function invariant(ok, message)
  -- Checked before any write: a script that errors after writing would leave them behind.
  if not ok then
    error('BEAM_INVARIANT ' .. message .. ' on ' .. KEYS[1])
  end
end

-- Moves up to `limit` overdue open holds into the expiring set. Each shrinks to what it
-- consumed (streamed tokens were delivered); the rest goes back to `available`. The
-- reaper settles expiring holds into PostgreSQL, then releases them here.
local function expire_due(now_ms, limit)
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, limit)
  if #due == 0 then
    return 0
  end
  local held = num(redis.call('HGET', KEYS[1], 'held'))
  local prefix = key_prefix()
  local shrink = {}
  for i, rid in ipairs(due) do
    local f = redis.call('HMGET', prefix .. 'h:' .. rid, 'amount', 'consumed', 'status')
    if f[3] == 'open' then
      local amount, consumed = num(f[1]), num(f[2])
      invariant(consumed <= amount, 'consumed > amount')
      held = held - (amount - consumed)
      shrink[i] = consumed
    end
  end
  invariant(held >= 0, 'held < 0 after expiry')
  for i, rid in ipairs(due) do
    if shrink[i] ~= nil then
      redis.call('HSET', prefix .. 'h:' .. rid, 'amount', fmt(shrink[i]),
        'status', 'expiring', 'expired_at', fmt(now_ms))
    end
    redis.call('ZREM', KEYS[2], rid)
    redis.call('ZADD', KEYS[3], fmt(now_ms), rid)
  end
  redis.call('HSET', KEYS[1], 'held', fmt(held))
  return #due
end

local function account()
  local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'state', 'ttl_ms',
    'max_request_grains')
  return num(f[1]), num(f[2]), f[3] or 'active', num(f[4]), num(f[5])
end
