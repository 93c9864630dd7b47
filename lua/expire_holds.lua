-- Reaper, per customer: expire overdue open holds, and list the holds that need the
-- reaper: expiring ones (to record in PostgreSQL, then release) and settling ones whose
-- commit has been pending for at least `grace_ms` (to complete from the ledger, or, past
-- their deadline, to abandon).
local now_ms   = tonumber(ARGV[1])
local limit    = tonumber(ARGV[2])
local grace_ms = tonumber(ARGV[3])
-- Returns {expiring, settling}, each a list of holds; every hold is the list
--   {hold_id, kind, status, nonce, amount, consumed, in_tokens, out_tokens, cached_tokens,
--    model, estimated, created_ms, marked_ms, deadline_ms, attempt, token}
-- (token: the request token's nonce a claim settles for; '' for other holds)
-- (deadline_ms is the hold's score in its set). At most `limit` of each.
if redis.call('EXISTS', KEYS[1]) == 1 then
  expire_due(now_ms, limit)
end
local prefix = key_prefix()

local function describe(rid, score)
  local h = redis.call('HMGET', prefix .. HOLD_PREFIX .. rid, 'kind', 'status', 'nonce',
    'amount', 'consumed', 'in_tokens', 'out_tokens', 'cached_tokens', 'model', 'estimated',
    'created', 'marked', 'attempt', 'token')
  if h[2] == false then
    return nil
  end
  return {rid, h[1] or 'request', h[2], h[3] or '', num(h[4]), num(h[5]), num(h[6]),
    num(h[7]), num(h[8]), h[9] or '', num(h[10]), num(h[11]), num(h[12]), num(score),
    num(h[13]), h[14] or ''}
end

local expiring = {}
local flat = redis.call('ZRANGE', KEYS[3], 0, limit - 1, 'WITHSCORES')
for i = 1, #flat, 2 do
  local hold = describe(flat[i], flat[i + 1])
  if hold == nil then
    holds_changed()
    redis.call('ZREM', KEYS[3], flat[i])  -- released by a concurrent settlement
  else
    table.insert(expiring, hold)
  end
end

-- The settling holds in deadline order, at most `limit` visited (those still within their
-- grace count too: a customer's hundreds of settlements in flight never make a long
-- script; one past its grace behind them is found once they have committed).
local settling = {}
flat = redis.call('ZRANGE', KEYS[6], 0, limit - 1, 'WITHSCORES')
for i = 1, #flat, 2 do
  local hold = describe(flat[i], flat[i + 1])
  if hold == nil then
    holds_changed()
    redis.call('ZREM', KEYS[6], flat[i])
  elseif hold[13] + grace_ms <= now_ms then
    table.insert(settling, hold)
  end
end
return {expiring, settling}
