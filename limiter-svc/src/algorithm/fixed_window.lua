-- Fixed window: one counter per window of `window` µs aligned on the Redis epoch.
-- Allows up to 2 * limit across a window boundary (the classic burst); exact within a window.
-- Memory: one small hash (w, n) per key.
-- p = { limit, window (µs), burst (unused), cost }.
ALGORITHMS[3] = {
  peek = function(key, now, p, writable)
    local idx = math.floor(now / p.window)
    local st = redis.call('HMGET', key, 'w', 'n')
    local n = 0
    if tonumber(st[1]) == idx then n = tonumber(st[2]) or 0 end
    local ends = (idx + 1) * p.window - now
    local r = { allowed = 0, remaining = math.max(0, p.limit - n), retry = 0, reset = 0, idx = idx, n = n }
    if n > 0 then r.reset = ends end
    if n + p.cost <= p.limit then r.allowed = 1 else r.retry = ends end
    return r
  end,
  commit = function(key, now, p, r, nonce)
    redis.call('HSET', key, 'w', r.idx, 'n', r.n + p.cost)
    local ends = (r.idx + 1) * p.window - now
    redis.call('PEXPIRE', key, math.ceil(ends / 1000))
    r.reset = ends
  end,
  refund = function(key, now, p, nonce)
    local idx = math.floor(now / p.window)
    if tonumber(redis.call('HGET', key, 'w')) == idx then
      redis.call('HINCRBY', key, 'n', -p.cost)
    end
  end,
}
