-- Sliding window log (exact): a sorted set with one member per admitted unit, scored by the
-- Redis time (µs) it was admitted. A unit is live while score > now - window.
-- Memory: one member (~50-80 bytes) per unit admitted in the last window, bounded by `limit`.
-- p = { limit, window (µs), burst (unused), cost }.
ALGORITHMS[1] = {
  peek = function(key, now, p, writable)
    local from = now - p.window
    if writable then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', from))
    end
    local live = string.format('(%d', from)
    local count = redis.call('ZCOUNT', key, live, '+inf')
    local r = { allowed = 0, remaining = math.max(0, p.limit - count), retry = 0, reset = 0 }
    if count + p.cost <= p.limit then
      r.allowed = 1
    else
      -- The request fits once the (count + cost - limit)-th oldest live unit leaves the window.
      local need = count + p.cost - p.limit
      local e = redis.call('ZRANGEBYSCORE', key, live, '+inf', 'WITHSCORES', 'LIMIT', need - 1, 1)
      if e[2] then r.retry = tonumber(e[2]) + p.window - now else r.retry = p.window end
    end
    local newest = redis.call('ZREVRANGEBYSCORE', key, '+inf', live, 'WITHSCORES', 'LIMIT', 0, 1)
    if newest[2] then r.reset = tonumber(newest[2]) + p.window - now end
    return r
  end,
  commit = function(key, now, p, r, nonce)
    -- ZADD in chunks: Lua's unpack has a stack limit.
    local args = {}
    for i = 1, p.cost do
      args[#args + 1] = now
      args[#args + 1] = nonce .. ':' .. i
      if #args >= 1000 or i == p.cost then
        redis.call('ZADD', key, unpack(args))
        args = {}
      end
    end
    redis.call('PEXPIRE', key, math.ceil(p.window / 1000))
    r.reset = p.window
  end,
  refund = function(key, now, p, nonce)
    local members = {}
    for i = 1, p.cost do
      members[#members + 1] = nonce .. ':' .. i
      if #members >= 1000 or i == p.cost then
        redis.call('ZREM', key, unpack(members))
        members = {}
      end
    end
  end,
}
