-- verify-integrity: the account as Redis sees it and the holds it is made of.
local inline_limit = tonumber(ARGV[1])  -- the most holds summed here
-- Returns {exists(0|1), balance, held, version, sum_of_hold_amounts, open_count,
--          expiring_count, settling_count, holds_seq, server_run}. With more than
-- inline_limit holds the sum is -1: the caller sums them in bounded steps (scan_holds),
-- each of which must see holds_seq and server_run unchanged, so one customer's many
-- holds never make one long script.
local open, expiring, settling = redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
  redis.call('ZCARD', KEYS[6])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0, 0, 0, open, expiring, settling, holds_seq(), server_run()}
end
local f = redis.call('HMGET', KEYS[1], 'balance', 'held', 'version')
local total = -1
if open + expiring + settling <= inline_limit then
  total = sum_of_holds()
end
return {1, num(f[1]), num(f[2]), num(f[3]), total, open, expiring, settling, holds_seq(),
  server_run()}
