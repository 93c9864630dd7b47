-- sync: every hold of a customer, so the caller can release those the ledger has settled
-- (a restart that lost Redis's last writes brings settled holds back). No ARGV.
-- Returns a list of {hold_id, nonce, status, kind}; bounded by max open holds.
local out = {}
local prefix = key_prefix()
for _, set in ipairs({KEYS[2], KEYS[3], KEYS[6]}) do
  for _, rid in ipairs(redis.call('ZRANGE', set, 0, -1)) do
    local h = redis.call('HMGET', prefix .. HOLD_PREFIX .. rid, 'nonce', 'status', 'kind')
    if h[2] then
      table.insert(out, {rid, h[1] or '', h[2], h[3] or 'request'})
    end
  end
end
return out
