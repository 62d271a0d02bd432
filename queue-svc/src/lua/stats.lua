-- stats: depth per priority (5 levels), scheduled, leased, dead, retained finished tasks,
-- paused, and the per-minute counters of the previous minute: enqueued, completed, failed.
-- Returns {ready_0 .. ready_4, scheduled, leased, dead, done, paused, enqueued, completed, failed,
-- cancelled (of done)}.
local reply = {}
for p = 0, 4 do
  reply[#reply + 1] = redis.call('LLEN', ready_key(p))
end
reply[#reply + 1] = redis.call('ZCARD', K_SCHED)
reply[#reply + 1] = redis.call('ZCARD', K_LEASED)
reply[#reply + 1] = redis.call('ZCARD', K_DEAD)
local cancelled = tonumber(redis.call('HGET', K_META, 'cancelled') or '0')
reply[#reply + 1] = redis.call('ZCARD', K_DONE)
reply[#reply + 1] = (redis.call('HGET', K_META, 'paused') == '1') and 1 or 0
local minute = math.floor(now / 60000) - 1
for _, what in ipairs({ 'enqueued', 'completed', 'failed' }) do
  reply[#reply + 1] = tonumber(redis.call('HGET', K_META, what .. ':' .. minute) or '0')
end
reply[#reply + 1] = math.max(0, cancelled)
return reply
