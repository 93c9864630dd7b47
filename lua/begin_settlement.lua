-- FinalizeRequest (and a late Finalize's adjustment), step 1 of 3: compute the charge and
-- reserve it before anything is committed. Steps 2 and 3 are the PostgreSQL commit and
-- settle_hold.
local now_ms        = tonumber(ARGV[1])
local hold_id       = ARGV[2]
local token_nonce   = ARGV[3]             -- '' when the Finalize carries no request_token
local claim_nonce   = ARGV[4]             -- nonce of the claim this call may create
local total_cost    = tonumber(ARGV[5])   -- the provider's cost; 0 = compute it
local prompt        = tonumber(ARGV[6])   -- includes cached prompt tokens
local completion    = tonumber(ARGV[7])
local cached        = tonumber(ARGV[8])
local has_prices    = ARGV[9]             -- '1': p_in/p_out/p_cached price a hold without
local arg_p_in      = tonumber(ARGV[10])  --      locked prices, or a claim
local arg_p_out     = tonumber(ARGV[11])
local arg_p_cached  = tonumber(ARGV[12])
local expire_batch  = tonumber(ARGV[13])
local settle_ttl_ms = tonumber(ARGV[14])  -- how long a settling hold may wait for its commit
-- Returns one of
--   {'DONE', charged, refunded, final_balance, overage, status, nonce}
--        settled before (the done marker), and not an expiry a late Finalize may adjust
--   {'SETTLE', claim(0|1), nonce, reserved, charged, consumed, estimated, model, in_tokens,
--    out_tokens, cached_tokens, created_ms, attempt}
--        the hold (or a new claim, when there is no hold) is now settling and reserves at
--        least `charged`; commit the settlement, then run settle_hold with `nonce`.
--        `attempt` counts the settlements begun on this hold: the commit carries it, and
--        once the reaper abandons the hold (fencing attempts up to its own count in
--        PostgreSQL), a late commit of an earlier attempt is refused.
--   {'ERR', code}   INVALID_REQUEST_TOKEN, UNKNOWN_MODEL, COST_LIMIT, SETTLEMENT_IN_FLIGHT
--        (a claim made for another request token is settling: retry once it is done)
--   {'NOT_LOADED'}
-- Why reserve first: if the process dies, or the caller is cancelled, between the commit
-- and settle_hold, Redis still holds at least the charge, so its `available` is below the
-- ledger's, never above; the reaper completes the Redis half from the ledger.

local function charge(has_locked, p_in, p_out, p_cached, consumed)
  if total_cost > 0 then
    return total_cost
  end
  if prompt == 0 and completion == 0 then
    return consumed  -- no usage reported: what the stream consumed (never free)
  end
  if not has_locked then
    if has_prices ~= '1' then
      return nil
    end
    p_in, p_out, p_cached = arg_p_in, arg_p_out, arg_p_cached
  end
  return token_cost(prompt - cached, completion, cached, p_in, p_out, p_cached)
end

local hold_exists = redis.call('EXISTS', KEYS[4]) == 1
if not hold_exists then
  local d = redis.call('HMGET', KEYS[5], 'charged', 'refunded', 'final_balance', 'overage',
    'status', 'nonce')
  -- A token of another hold than the one the marker settled (its own marker names it)
  -- goes on to a claim, exactly as once the marker is gone: that hold was lost by Redis
  -- and its usage is charged on its own (PostgresStore.record_settlement), today or
  -- tomorrow alike.
  local other = token_nonce ~= '' and (d[6] or '') ~= '' and token_nonce ~= d[6]
  if d[1] and d[5] ~= 'expired' and not other then
    return {'DONE', num(d[1]), num(d[2]), num(d[3]), num(d[4]), d[5], d[6] or ''}
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'NOT_LOADED'}
end
expire_due(now_ms, expire_batch)
local _, held = account()
local deadline = now_ms + settle_ttl_ms

if not hold_exists then
  -- No hold: never checked, its hold was lost, or settled and expired (a late Finalize).
  -- A claim reserves the charge and blocks a concurrent Check of this id.
  local cost = charge(false, 0, 0, 0, 0)
  if cost == nil then
    return {'ERR', 'UNKNOWN_MODEL'}
  end
  if cost > MAX_GRAINS - held then
    return {'ERR', 'COST_LIMIT'}  -- `held` must stay an exact integer (a double's 53 bits)
  end
  -- A claim remembers the token it settles for (the hold that token names may be a
  -- second hold Redis lost, charged on its own): only a Finalize with that token takes
  -- the claim over, and the reaper looks for that hold's own entry.
  holds_changed()
  redis.call('HSET', KEYS[4], 'status', 'settling', 'kind', 'claim', 'amount', fmt(cost),
    'consumed', '0', 'nonce', claim_nonce, 'fp', '', 'created', fmt(now_ms),
    'marked', fmt(now_ms), 'estimated', '0', 'model', '', 'in_tokens', '0',
    'out_tokens', '0', 'cached_tokens', '0', 'attempt', '1', 'token', token_nonce)
  redis.call('ZADD', KEYS[6], fmt(deadline), hold_id)
  redis.call('HSET', KEYS[1], 'held', fmt(held + cost))
  return {'SETTLE', 1, claim_nonce, 0, cost, 0, 0, '', 0, 0, 0, now_ms, 1}
end

local h = redis.call('HMGET', KEYS[4], 'nonce', 'status', 'kind', 'amount', 'consumed',
  'has_prices', 'p_in', 'p_out', 'p_cached', 'model', 'estimated', 'in_tokens',
  'out_tokens', 'cached_tokens', 'created', 'ttl_ms', 'token')
local kind = h[3] or 'request'
local claim_token = h[17] or ''
if kind == 'claim' and claim_token ~= '' and token_nonce ~= claim_token then
  -- Settling the usage of the hold another token names: taking it over would release its
  -- reservation before its commit lands. Answered as retryable.
  return {'ERR', 'SETTLEMENT_IN_FLIGHT'}
end
if token_nonce ~= '' and token_nonce ~= h[1] and token_nonce ~= claim_token then
  return {'ERR', 'INVALID_REQUEST_TOKEN'}
end
local amount, consumed = num(h[4]), num(h[5])
local cost = charge(h[6] == '1', num(h[7]), num(h[8]), num(h[9]), consumed)
if cost == nil then
  return {'ERR', 'UNKNOWN_MODEL'}
end
if cost > MAX_GRAINS or cost > MAX_GRAINS - (held - amount) then
  return {'ERR', 'COST_LIMIT'}  -- `held` must stay an exact integer (a double's 53 bits)
end
-- Grow the hold to the charge, even past the balance: the customer owes it once the ledger
-- commits, and until Redis adopts that balance the hold must keep it from being spent.
local reserve = math.max(amount, cost)
if reserve ~= amount or h[2] ~= 'settling' then
  holds_changed()
end
redis.call('HSET', KEYS[1], 'held', fmt(held + reserve - amount))
if h[2] ~= 'settling' then
  deadline = math.max(deadline, now_ms + num(h[16]))
  redis.call('ZREM', KEYS[2], hold_id)
  redis.call('ZREM', KEYS[3], hold_id)
  redis.call('ZADD', KEYS[6], fmt(deadline), hold_id)
end
local reserved = amount  -- what the hold held before its settlement began
if h[2] == 'settling' then
  reserved = num(redis.call('HGET', KEYS[4], 'reserved'))
else
  redis.call('HSET', KEYS[4], 'reserved', fmt(amount))
end
redis.call('HSET', KEYS[4], 'status', 'settling', 'amount', fmt(reserve),
  'marked', fmt(now_ms))
local attempt = redis.call('HINCRBY', KEYS[4], 'attempt', 1)
local claim = 0
if kind == 'claim' then
  claim, reserved = 1, 0
end
return {'SETTLE', claim, h[1], reserved, cost, consumed, num(h[11]), h[10] or '',
  num(h[12]), num(h[13]), num(h[14]), num(h[15]), attempt}
