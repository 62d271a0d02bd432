-- Token bucket: holds up to `burst` tokens (burst 0 = limit), refilled continuously at
-- `limit` tokens per `window`; a request takes `cost` tokens.
-- Memory: one small hash (tokens, ts) per key, kept until the bucket is full again (at least
-- KEEP_MS after a write).
-- p = { limit, window (µs), burst }. peek returns the tokens now as commit's state.
local function bucket_capacity(p)
  if p.burst > 0 then return p.burst end
  return p.limit
end

ALGORITHMS[4] = {
  peek = function(key, now, p, cost, writable)
    local cap = bucket_capacity(p)
    local rate = p.limit / p.window -- tokens per µs
    local st = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens = cap
    if st[1] then
      tokens = min(cap, tonumber(st[1]) + max(0, now - tonumber(st[2])) * rate)
    end
    local reset = 0
    if tokens < cap then reset = ceil((cap - tokens) / rate) end
    if tokens + 1e-9 >= cost then
      return 1, cap, floor(tokens + 1e-9), reset, 0, tokens
    end
    return 0, cap, floor(tokens + 1e-9), reset, ceil((cost - tokens) / rate), tokens
  end,
  commit = function(key, now, p, cost, nonce, tokens)
    local cap = bucket_capacity(p)
    local rate = p.limit / p.window
    local left = tokens - cost
    redis.call('HSET', key, 'tokens', left, 'ts', int(now))
    local reset = ceil((cap - left) / rate)
    redis.call('PEXPIRE', key, int(max(ceil(reset / 1000) + 1, KEEP_MS)))
    return reset
  end,
  refund = function(key, now, p, cost, nonce)
    local tokens = tonumber(redis.call('HGET', key, 'tokens'))
    if tokens then
      redis.call('HSET', key, 'tokens', min(bucket_capacity(p), tokens + cost))
    end
  end,
}
