-- Token bucket: holds up to `burst` tokens (burst 0 = limit), refilled continuously at
-- `limit` tokens per `window`; a request takes `cost` tokens.
-- Memory: one small hash (tokens, ts) per key.
-- p = { limit, window (µs), burst, cost }.
local function bucket_capacity(p)
  if p.burst > 0 then return p.burst end
  return p.limit
end

ALGORITHMS[4] = {
  peek = function(key, now, p, writable)
    local cap = bucket_capacity(p)
    local rate = p.limit / p.window -- tokens per µs
    local st = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens = cap
    if st[1] then
      tokens = math.min(cap, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * rate)
    end
    local r = { allowed = 0, remaining = math.floor(tokens + 1e-9), retry = 0, reset = 0, tokens = tokens, limit = cap }
    if tokens + 1e-9 >= p.cost then
      r.allowed = 1
    else
      r.retry = math.ceil((p.cost - tokens) / rate)
    end
    if tokens < cap then r.reset = math.ceil((cap - tokens) / rate) end
    return r
  end,
  commit = function(key, now, p, r, nonce)
    local cap = bucket_capacity(p)
    local rate = p.limit / p.window
    local left = r.tokens - p.cost
    redis.call('HSET', key, 'tokens', left, 'ts', now)
    r.reset = math.ceil((cap - left) / rate)
    redis.call('PEXPIRE', key, math.ceil(r.reset / 1000) + 1)
  end,
  refund = function(key, now, p, nonce)
    local tokens = tonumber(redis.call('HGET', key, 'tokens'))
    if tokens then
      redis.call('HSET', key, 'tokens', math.min(bucket_capacity(p), tokens + p.cost))
    end
  end,
}
