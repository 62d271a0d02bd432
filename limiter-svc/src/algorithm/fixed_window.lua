-- Fixed window: one counter per window of `window` µs aligned on the Redis epoch.
-- Allows up to 2 * limit across a window boundary (the classic burst); exact within a window.
-- Memory: one small hash (w, n) per key.
-- p = { limit, window (µs), burst (unused) }. peek returns the window and its count as
-- commit's state.
ALGORITHMS[3] = {
  peek = function(key, now, p, cost, writable)
    local idx = floor(now / p.window)
    local st = redis.call('HMGET', key, 'w', 'n')
    local n = 0
    if tonumber(st[1]) == idx then n = tonumber(st[2]) or 0 end
    local ends = (idx + 1) * p.window - now
    local reset = 0
    if n > 0 then reset = ends end
    local remaining = max(0, p.limit - n)
    if n + cost <= p.limit then
      return 1, p.limit, remaining, reset, 0, idx, n
    end
    return 0, p.limit, remaining, reset, ends, idx, n
  end,
  commit = function(key, now, p, cost, nonce, idx, n)
    redis.call('HSET', key, 'w', int(idx), 'n', int(n + cost))
    local ends = (idx + 1) * p.window - now
    redis.call('PEXPIRE', key, int(ceil(ends / 1000)))
    return ends
  end,
  refund = function(key, now, p, cost, nonce)
    local idx = floor(now / p.window)
    if tonumber(redis.call('HGET', key, 'w')) == idx then
      redis.call('HINCRBY', key, 'n', int(-cost))
    end
  end,
}
