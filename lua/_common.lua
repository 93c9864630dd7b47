-- Shared prelude of every Beam script. The loader (beam.adapters.scripts) puts the
-- constants block generated from beam.constants in front of it (MAX_GRAINS, MILLION,
-- HOLD_PREFIX, ACCOUNT_SUFFIX, HOLDS_SEQ_SUFFIX, SEQUENCE_WINDOW), so no limit is written
-- twice.
--
-- KEYS (beam.constants.customer_keys), all under one hash tag {tenant:customer}:
--   KEYS[1] account hash    balance, version, held, state, ttl_ms, max_request_grains
--   KEYS[2] open holds      zset: hold id -> expiry (unix ms)
--   KEYS[3] expiring holds  zset: hold id -> time it expired; awaiting the reaper
--   KEYS[4] hold hash       status, kind, amount, consumed, tokens, locked prices, nonce, ...
--   KEYS[5] done marker     hash with the settlement, kept for retries (has a TTL)
--   KEYS[6] settling holds  zset: hold id -> deadline (unix ms); PostgreSQL commit pending
-- Per-hold keys of other holds are derived from KEYS[1]'s prefix: same tag, same slot, and
-- so is the holds counter (HOLDS_SEQ_SUFFIX): every script that adds, removes or moves a
-- hold, or changes its amount, bumps it (holds_changed), so a scan of many holds in bounded
-- steps (scan_holds, one script per page) can tell whether all its pages saw one state.
--
-- A hold is in exactly one of the three sets, by its status:
--   open      -> KEYS[2]  chargeable by Deduct; expires at its score
--   expiring  -> KEYS[3]  shrunk to what it consumed; the reaper records it, then releases it
--   settling  -> KEYS[6]  a settlement (Finalize, debit, late adjustment) is being committed
--                         to PostgreSQL; the hold keeps at least the charge reserved until
--                         Redis adopts the committed balance, so a lost update over-reserves
-- kind: request (opened by Check), claim (a Finalize or adjustment with no open hold),
-- debit (an admin debit; its id starts with '#', which no client id can).
--
-- Numbers: Lua 5.1 numbers are doubles; every amount is bounded by 2^53-1 (exact).
-- Numbers are written back with fmt() so Redis never stores an exponent form.

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
  return string.sub(KEYS[1], 1, #KEYS[1] - #ACCOUNT_SUFFIX)
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

-- ceil(estimated x multiplier_ppm / 1e6), exact: estimated = q * 1e6 + r, and q * ppm is
-- exact while it is below 2^53 (above that no balance could cover the hold anyway).
local function hold_for(estimated, multiplier_ppm)
  local q, r = split_price(estimated)
  local amount = q * multiplier_ppm
  local frac = r * multiplier_ppm
  local rest = math.fmod(frac, MILLION)
  amount = amount + (frac - rest) / MILLION
  if rest > 0 then
    amount = amount + 1
  end
  return amount
end

-- The most completion tokens (at most max_out) that `amount` pays for at these prices,
-- given the prompt tokens already charged; 0 if not even the prompt is covered. Exact
-- (token_cost), bounded: 32 halvings.
local function covered_out(amount, in_tokens, cached_tokens, p_in, p_out, p_cached, max_out)
  local function fits(t)
    return token_cost(in_tokens, t, cached_tokens, p_in, p_out, p_cached) <= amount
  end
  if not fits(0) then
    return 0
  end
  if fits(max_out) then
    return max_out
  end
  local lo, hi = 0, max_out
  for _ = 1, 32 do
    if hi - lo <= 1 then
      break
    end
    local mid = math.floor((lo + hi) / 2)
    if fits(mid) then
      lo = mid
    else
      hi = mid
    end
  end
  return lo
end

-- The holds changed (see the header). A key of its own: INCR must never bring an account
-- hash into being.
local function holds_changed()
  redis.call('INCR', key_prefix() .. HOLDS_SEQ_SUFFIX)
end

local function holds_seq()
  return num(redis.call('GET', key_prefix() .. HOLDS_SEQ_SUFFIX))
end

-- The Redis server process (INFO's run_id): a stepwise scan must run on one. Another one (a
-- restart, a failover) keeps no ZSCAN cursor's meaning, and may have lost writes that took
-- the holds counter back to a value the scan already saw.
local function server_run()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
end

local function hold_count()
  return redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
    + redis.call('ZCARD', KEYS[6])
end

local function invariant(ok, message)
  -- Checked before any write: a script that errors after writing would leave them behind.
  if not ok then
    error('BEAM_INVARIANT ' .. message .. ' on ' .. KEYS[1])
  end
end

-- Moves up to `limit` overdue open holds into the expiring set. Each shrinks to what it
-- consumed (streamed tokens were delivered); the rest goes back to `available`. The
-- reaper settles expiring holds into PostgreSQL, then releases them here. Settling holds
-- are never in the open set, so a settlement in flight keeps its reservation.
local function expire_due(now_ms, limit)
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, limit)
  if #due == 0 then
    return 0
  end
  local held = num(redis.call('HGET', KEYS[1], 'held'))
  local prefix = key_prefix()
  local shrink = {}
  for i, rid in ipairs(due) do
    local f = redis.call('HMGET', prefix .. HOLD_PREFIX .. rid, 'amount', 'consumed', 'status')
    if f[3] == 'open' then
      local amount, consumed = num(f[1]), num(f[2])
      invariant(consumed <= amount, 'consumed > amount')
      held = held - (amount - consumed)
      shrink[i] = consumed
    end
  end
  invariant(held >= 0, 'held < 0 after expiry')
  holds_changed()
  for i, rid in ipairs(due) do
    if shrink[i] ~= nil then
      redis.call('HSET', prefix .. HOLD_PREFIX .. rid, 'amount', fmt(shrink[i]),
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

-- Sum of the amounts of every hold in the three sets. Its cost grows with the holds: the
-- callers run it only for at most the caller's limit of holds (hold_count), and leave more
-- to a stepwise scan.
local function sum_of_holds()
  local total = 0
  local prefix = key_prefix()
  for _, set in ipairs({KEYS[2], KEYS[3], KEYS[6]}) do
    for _, rid in ipairs(redis.call('ZRANGE', set, 0, -1)) do
      total = total + num(redis.call('HGET', prefix .. HOLD_PREFIX .. rid, 'amount'))
    end
  end
  return total
end

-- Deletes hold KEYS[4] (id `rid`) from every set; returns the amount it held.
local function drop_hold(rid)
  local amount = num(redis.call('HGET', KEYS[4], 'amount'))
  holds_changed()
  redis.call('DEL', KEYS[4])
  redis.call('ZREM', KEYS[2], rid)
  redis.call('ZREM', KEYS[3], rid)
  redis.call('ZREM', KEYS[6], rid)
  return amount
end
