-- One step of a scan of a customer's holds (VerifyIntegrity, a sync, a forced load of a
-- customer with more holds than one script should visit): ZSCAN of one hold set from a
-- cursor. Bounded: about `count` holds per call (ZSCAN's COUNT is a hint; a hold may come
-- twice, the caller keeps one of each).
local which  = tonumber(ARGV[1])  -- 1 open, 2 expiring, 3 settling
local cursor = ARGV[2]
local count  = tonumber(ARGV[3])
-- Returns {next_cursor ('0': done), holds_seq, server_run, holds}; holds is a list of
--   {hold_id, amount, nonce, status, kind}  (status '' when the hold hash is gone)
-- The scan saw one state of the holds iff every step answered the same holds_seq and the
-- same server_run (lua/_common.lua).
local set = ({KEYS[2], KEYS[3], KEYS[6]})[which]
local reply = redis.call('ZSCAN', set, cursor, 'COUNT', count)
local prefix = key_prefix()
local holds = {}
for i = 1, #reply[2], 2 do
  local rid = reply[2][i]
  local h = redis.call('HMGET', prefix .. HOLD_PREFIX .. rid, 'amount', 'nonce', 'status',
    'kind')
  table.insert(holds, {rid, num(h[1]), h[2] or '', h[3] or '', h[4] or 'request'})
end
return {reply[1], holds_seq(), server_run(), holds}
