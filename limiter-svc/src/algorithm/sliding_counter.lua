-- Sliding window counter (approximate, O(1) memory): counts of the current and the previous
-- fixed window; the estimate weighs the previous count by the share of it still inside the
-- sliding window: prev * (window - elapsed) / window + cur.
-- Memory: one small hash (w, cur, prev) per key.
-- p = { limit, window (µs), burst (unused) }. peek returns the window and both counts as
-- commit's state.
local function counter_state(key, now, p)
  local idx = floor(now / p.window)
  local st = redis.call('HMGET', key, 'w', 'cur', 'prev')
  local w, cur, prev = tonumber(st[1]), tonumber(st[2]) or 0, tonumber(st[3]) or 0
  if w == idx then
    -- same window
  elseif w == idx - 1 then
    prev, cur = cur, 0
  else
    prev, cur = 0, 0
  end
  return idx, cur, prev
end

ALGORITHMS[2] = {
  peek = function(key, now, p, cost, writable)
    local idx, cur, prev = counter_state(key, now, p)
    local start = idx * p.window
    local elapsed = now - start
    local estimate = prev * (p.window - elapsed) / p.window + cur
    local allowed, retry, reset = 0, 0, 0
    if estimate + cost <= p.limit then
      allowed = 1
    elseif cur + cost <= p.limit then
      -- Later in this window the previous count has decayed enough.
      local e = p.window * (1 - (p.limit - cur - cost) / prev)
      retry = ceil(start + e - now)
    else
      -- Next window: this window's count becomes the decaying previous one.
      local e = 0
      if cur > 0 then e = max(0, p.window * (1 - (p.limit - cost) / cur)) end
      retry = ceil(start + p.window + e - now)
    end
    if cur > 0 then
      reset = start + 2 * p.window - now
    elseif prev > 0 then
      reset = start + p.window - now
    end
    return allowed, p.limit, max(0, floor(p.limit - estimate)), reset, retry, idx, cur, prev
  end,
  commit = function(key, now, p, cost, nonce, idx, cur, prev)
    redis.call('HSET', key, 'w', int(idx), 'cur', int(cur + cost), 'prev', int(prev))
    redis.call('PEXPIRE', key, int(ceil(2 * p.window / 1000)))
    return idx * p.window + 2 * p.window - now
  end,
  refund = function(key, now, p, cost, nonce)
    local idx = floor(now / p.window)
    if tonumber(redis.call('HGET', key, 'w')) == idx then
      redis.call('HINCRBY', key, 'cur', int(-cost))
    end
  end,
}
