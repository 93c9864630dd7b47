-- CheckBalance, after the ledger was asked: take back a hold this Check opened, without
-- ever losing what somebody else did with it meanwhile.
local hold_id = ARGV[1]
local nonce   = ARGV[2]
local now_ms  = tonumber(ARGV[3])
local mode    = ARGV[4]  -- 'cancelled': the Check's caller left; 'settled': the id is settled
-- Returns {'VOIDED'|'KEPT'|'EXPIRING'|'GONE'}:
--   VOIDED    untouched (open, nothing consumed, no other Check was answered with it):
--             released, as if never opened
--   KEPT      'cancelled' and touched: another Check was answered with it, or it streamed;
--             it stays open for them
--   EXPIRING  'settled' and touched: its id was settled by another hold, so it may not go on,
--             but what it consumed was delivered: shrunk to that and left for the reaper,
--             which charges it on its own
--   GONE      not this hold any more
local h = redis.call('HMGET', KEYS[4], 'nonce', 'status', 'amount', 'consumed', 'replays')
if h[1] ~= nonce or h[2] ~= 'open' then
  return {'GONE'}
end
local amount, consumed = num(h[3]), num(h[4])
local held = num(redis.call('HGET', KEYS[1], 'held'))
if consumed == 0 and num(h[5]) == 0 then
  drop_hold(hold_id)
  redis.call('HSET', KEYS[1], 'held', fmt(held - amount))
  return {'VOIDED'}
end
if mode == 'cancelled' then
  return {'KEPT'}
end
invariant(consumed <= amount, 'consumed > amount')
holds_changed()
redis.call('HSET', KEYS[4], 'status', 'expiring', 'amount', fmt(consumed),
  'expired_at', fmt(now_ms))
redis.call('ZREM', KEYS[2], hold_id)
redis.call('ZADD', KEYS[3], fmt(now_ms), hold_id)
redis.call('HSET', KEYS[1], 'held', fmt(held - (amount - consumed)))
return {'EXPIRING'}
