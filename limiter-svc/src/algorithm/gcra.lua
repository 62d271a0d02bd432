-- GCRA (generic cell rate algorithm): one "theoretical arrival time" (TAT) per key. Each unit
-- advances TAT by the emission interval T = window / limit; a request passes when
-- TAT + cost*T - burst*T <= now (burst 0 = limit). Same admissions as a token bucket,
-- in one number.
-- Memory: one string per key.
-- p = { limit, window (µs), burst, cost }.
local function gcra_burst(p)
  if p.burst > 0 then return p.burst end
  return p.limit
end

ALGORITHMS[5] = {
  peek = function(key, now, p, writable)
    local burst = gcra_burst(p)
    local t = p.window / p.limit
    local tat = math.max(tonumber(redis.call('GET', key)) or now, now)
    local new_tat = tat + p.cost * t
    local allow_at = new_tat - burst * t
    local r = {
      allowed = 0,
      remaining = math.max(0, math.min(burst, math.floor((now - (tat - burst * t)) / t + 1e-9))),
      retry = 0,
      reset = math.ceil(tat - now),
      new_tat = new_tat,
      limit = burst,
    }
    if allow_at <= now + 1e-6 then
      r.allowed = 1
    else
      r.retry = math.ceil(allow_at - now)
    end
    return r
  end,
  commit = function(key, now, p, r, nonce)
    r.reset = math.ceil(r.new_tat - now)
    redis.call('SET', key, r.new_tat, 'PX', math.ceil(r.reset / 1000) + 1)
  end,
  refund = function(key, now, p, nonce)
    local tat = tonumber(redis.call('GET', key))
    if tat then
      local t = p.window / p.limit
      redis.call('SET', key, math.max(now, tat - p.cost * t), 'KEEPTTL')
    end
  end,
}
