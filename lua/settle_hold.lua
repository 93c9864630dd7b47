-- The last step of every settlement, after PostgreSQL committed it: release the hold it
-- settled, adopt the ledger's balance if it is newer, and keep a marker for retries.
local hold_id         = ARGV[1]
local nonce           = ARGV[2]            -- the hold to release; '' releases none
local balance_after   = ARGV[3]
local balance_version = tonumber(ARGV[4])  -- 0: adopt nothing (a void)
local write_marker    = ARGV[5]            -- '1': record the settlement in KEYS[5]
local charged         = ARGV[6]
local refunded        = ARGV[7]
local overage         = ARGV[8]
local status          = ARGV[9]
local settled_nonce   = ARGV[10]           -- the nonce PostgreSQL recorded for the request
local done_ttl        = ARGV[11]
local only_status     = ARGV[12]           -- release only a hold in this status ('' = any)
local final_balance   = ARGV[13]           -- the marker's: the balance the settlement left
                                           -- (the balance adopted may be a newer one)
local max_attempt     = tonumber(ARGV[14]) -- release only a hold settled by this attempt or
                                           -- an older one (0 = any): a stale attempt never
                                           -- drops the reservation of a newer one
-- Returns {released, held, balance}. Safe to run any number of times: only the hold with
-- this nonce is released (never a newer hold under a reused id), once; a stale balance
-- version is ignored. With balance_version 0 and no marker it voids a hold that nothing
-- was committed for (a Check for a settled id, a failed debit, an abandoned claim).
-- The reaper releases an expired hold only while it is still expiring: a Finalize that
-- took it over meanwhile keeps its reservation until its own commit (a late adjustment).
local released = 0
local h = redis.call('HMGET', KEYS[4], 'nonce', 'status', 'attempt')
if nonce ~= '' and h[1] == nonce and (only_status == '' or h[2] == only_status)
    and (max_attempt == 0 or num(h[3]) <= max_attempt) then
  released = drop_hold(hold_id)
end
local balance = 0
local held = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  held = num(redis.call('HGET', KEYS[1], 'held')) - released
  invariant(held >= 0, 'held < 0 after release')
  redis.call('HSET', KEYS[1], 'held', fmt(held))
  local version = num(redis.call('HGET', KEYS[1], 'version'))
  if balance_version > version then
    redis.call('HSET', KEYS[1], 'balance', balance_after, 'version', fmt(balance_version))
  end
  balance = num(redis.call('HGET', KEYS[1], 'balance'))
end
if write_marker == '1' then
  redis.call('HSET', KEYS[5], 'charged', charged, 'refunded', refunded,
    'final_balance', final_balance, 'overage', overage, 'status', status,
    'nonce', settled_nonce)
  redis.call('EXPIRE', KEYS[5], done_ttl)
end
return {released, held, balance}
