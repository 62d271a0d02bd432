-- reap: the queue's housekeeping, safe to run from every instance at once (each step is
-- atomic and bounded by ARGV[1] tasks):
--   expired leases fail as a timeout attempt (retried or dead-lettered);
--   due scheduled tasks become ready;
--   unless ARGV[2] is -1 (the reaper applies retention on every tenth pass only): finished
--   tasks older than ARGV[2] ms, dead letters older than ARGV[3] ms and expired idempotency
--   keys are removed.
-- Returns {expired, promoted, removed}.
local limit, retention, dead_retention = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local expired = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LEASED, '-inf', '(' .. now, 'LIMIT', 0, limit)) do
  local task = load(id)
  if task and task.st == 'leased' and task.dl < now then
    fail_attempt(task, 'timeout', 'lease expired before the task was completed or failed', true)
    save(task)
    expired = expired + 1
  else
    redis.call('ZREM', K_LEASED, id)
  end
end
local promoted = promote(limit)
local removed = 0
-- Cancelled tasks retained, kept in meta: only while there are some is a finished task's
-- record read before it goes.
local cancelled = tonumber(redis.call('HGET', K_META, 'cancelled') or '0')
local function drop(zset, before)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', before, 'LIMIT', 0, limit)) do
    if zset == K_DONE and cancelled > 0 then
      local task = load(id)
      if task and task.st == 'cancelled' and task.cc then
        cancelled = cancelled - 1
        redis.call('HINCRBY', K_META, 'cancelled', -1)
      end
    end
    redis.call('ZREM', zset, id)
    redis.call('HDEL', K_TASKS, id)
    redis.call('HDEL', K_PAYLOADS, id)
    redis.call('HDEL', K_RESULTS, id)
    removed = removed + 1
  end
end
if retention >= 0 then
  drop(K_DONE, now - retention)
  drop(K_DEAD, now - dead_retention)
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', K_IDEMX, '-inf', now, 'LIMIT', 0, limit)) do
    redis.call('ZREM', K_IDEMX, key)
    redis.call('HDEL', K_IDEM, key)
  end
end
wake_streams()
return { expired, promoted, removed }
