-- Sliding window log (exact): a sorted set with one member per admitted unit, scored by the
-- Redis time (µs) it was admitted. A unit is live while score > now - window.
-- Memory: one member (~50-80 bytes) per unit admitted in the last window, bounded by `limit`.
-- p = { limit, window (µs), burst (unused) }. Members are named `<nonce>:<i>`, so a refund
-- removes exactly what its request added.
ALGORITHMS[1] = {
  -- commit needs the request's nonce.
  named = true,
  peek = function(key, now, p, cost, writable)
    local from = now - p.window
    if writable then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', format('%d', from))
    end
    local live = format('(%d', from)
    local count = redis.call('ZCOUNT', key, live, '+inf')
    local allowed, retry, reset = 0, 0, 0
    if count + cost <= p.limit then
      allowed = 1
    else
      -- The request fits once the (count + cost - limit)-th oldest live unit leaves the window.
      local need = count + cost - p.limit
      local e = redis.call('ZRANGEBYSCORE', key, live, '+inf', 'WITHSCORES', 'LIMIT', need - 1, 1)
      if e[2] then retry = tonumber(e[2]) + p.window - now else retry = p.window end
    end
    local newest = redis.call('ZREVRANGEBYSCORE', key, '+inf', live, 'WITHSCORES', 'LIMIT', 0, 1)
    if newest[2] then reset = tonumber(newest[2]) + p.window - now end
    return allowed, p.limit, max(0, p.limit - count), reset, retry
  end,
  commit = function(key, now, p, cost, nonce)
    -- ZADD in chunks: Lua's unpack has a stack limit.
    local args, score = {}, int(now)
    for i = 1, cost do
      args[#args + 1] = score
      args[#args + 1] = nonce .. ':' .. i
      if #args >= 1000 or i == cost then
        redis.call('ZADD', key, unpack(args))
        args = {}
      end
    end
    redis.call('PEXPIRE', key, int(ceil(p.window / 1000)))
    return p.window
  end,
  refund = function(key, now, p, cost, nonce)
    local members = {}
    for i = 1, cost do
      members[#members + 1] = nonce .. ':' .. i
      if #members >= 1000 or i == cost then
        redis.call('ZREM', key, unpack(members))
        members = {}
      end
    end
  end,
}
