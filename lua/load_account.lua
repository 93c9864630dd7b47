-- Load (or re-sync) one account from PostgreSQL without dropping holds.
local balance            = ARGV[1]
local version            = tonumber(ARGV[2])
local state              = ARGV[3]  -- active | suspended | closed
local ttl_ms             = ARGV[4]  -- 0 = the service default
local max_request_grains = ARGV[5]  -- 0 = no cap
local force              = ARGV[6] == '1'  -- sync: adopt even an older version, re-derive held
local buffer_ppm         = ARGV[7]  -- the buffer strategy's multiplier, parts per million
local inline_limit       = tonumber(ARGV[8])  -- the most holds summed here
local scanned_held       = ARGV[9]  -- '' or the sum of a stepwise scan (scan_holds) ...
local scanned_seq        = ARGV[10] -- ... that saw this holds_seq throughout ...
local scanned_run        = ARGV[11] -- ... on this server process (server_run)
local keep_held          = ARGV[12] == '1'  -- no scan held still: keep an existing `held`
-- `held` is always re-derived from the holds when the account is created or forced, so a
-- lost account hash cannot leak or forget held money: summed here when there are at most
-- inline_limit holds, else taken from the caller's stepwise scan if the holds have not
-- changed since it (holds_seq) on this very server (server_run: a restart or a failover in
-- between voids the scan). Otherwise nothing is written and the caller scans (again).
-- When the caller's scans never held still (a busy customer), keep_held keeps the `held`
-- of an existing account: every script changes it atomically with the holds, and a Redis
-- that lost writes lost whole scripts, so re-deriving it is a check, not a repair (the
-- audit makes that check). Only a missing account must derive it: then in this script.
-- Returns {'OK', balance, held, version} or {'SCAN', holds_seq}.
local exists = redis.call('EXISTS', KEYS[1]) == 1
local derived = nil
if not exists or force then
  if hold_count() <= inline_limit then
    derived = sum_of_holds()
  elseif scanned_held ~= '' and tonumber(scanned_seq) == holds_seq()
      and scanned_run == server_run() then
    derived = tonumber(scanned_held)
  elseif keep_held and exists then
    derived = nil
  elseif keep_held then
    derived = sum_of_holds()
  else
    return {'SCAN', holds_seq()}
  end
end
redis.call('HSET', KEYS[1], 'state', state, 'ttl_ms', ttl_ms,
  'max_request_grains', max_request_grains, 'buffer_ppm', buffer_ppm)
local current = num(redis.call('HGET', KEYS[1], 'version'))
if not exists or force or version > current then
  redis.call('HSET', KEYS[1], 'balance', balance, 'version', fmt(version))
end
if derived ~= nil then
  holds_changed()  -- a scan in progress must not pair the old `held` with these holds
  redis.call('HSET', KEYS[1], 'held', fmt(derived))
end
local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'version')
return {'OK', num(f[1]), num(f[2]), num(f[3])}
