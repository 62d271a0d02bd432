-- GCRA (generic cell rate algorithm): one "theoretical arrival time" (TAT) per key. Each unit
-- advances TAT by the emission interval T = window / limit; a request passes when
-- TAT + cost*T - burst*T <= now (burst 0 = limit). Same admissions as a token bucket,
-- in one number.
-- Memory: one string per key, kept until its TAT passes (at least KEEP_MS after a write).
-- p = { limit, window (µs), burst }. peek returns the new TAT as commit's state.
ALGORITHMS[5] = {
  peek = function(key, now, p, cost, writable)
    local burst = p.burst
    if burst <= 0 then burst = p.limit end
    local t = p.window / p.limit
    local tat = tonumber(redis.call('GET', key)) or now
    if tat < now then tat = now end
    local new_tat = tat + cost * t
    local allow_at = new_tat - burst * t
    local remaining = floor((now - (tat - burst * t)) / t + 1e-9)
    if remaining > burst then remaining = burst end
    if remaining < 0 then remaining = 0 end
    local reset = ceil(tat - now)
    if allow_at <= now + 1e-6 then
      return 1, burst, remaining, reset, 0, new_tat
    end
    return 0, burst, remaining, reset, ceil(allow_at - now), new_tat
  end,
  commit = function(key, now, p, cost, nonce, new_tat)
    local reset = ceil(new_tat - now)
    redis.call('SET', key, decimal(new_tat), 'PX', int(max(ceil(reset / 1000) + 1, KEEP_MS)))
    return reset
  end,
  refund = function(key, now, p, cost, nonce)
    local tat = tonumber(redis.call('GET', key))
    if tat then
      local t = p.window / p.limit
      redis.call('SET', key, decimal(max(now, tat - cost * t)), 'KEEPTTL')
    end
  end,
}
