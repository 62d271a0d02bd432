-- enqueue: store a batch of tasks into one queue, all or none.
-- ARGV[1] max size (0 = unbounded; counts ready + scheduled + leased)
-- ARGV[2] idempotency retention (ms)
-- ARGV[3] n, then per task 4 args: record JSON, payload, not-before (ms, 0 = none),
--         delay (ms, 0 = none)
-- Returns {'full', size} or {'ok', then per task: id, duplicate (0/1), state}.
-- Why a script: the size check, the idempotency lookups and the writes must be one step.
local max_size, idem_ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local plan, fresh, seen = {}, 0, {}
for i = 1, n do
  local b = 3 + (i - 1) * 4
  local task = cjson.decode(ARGV[b + 1])
  -- (the id travels in the record here; save() stores it as the hash field)
  local existing = nil
  if task.idem then
    existing = seen[task.idem]
    if not existing then
      local id = redis.call('HGET', K_IDEM, task.idem)
      if id and redis.call('HEXISTS', K_TASKS, id) == 1 then existing = id end
    end
  end
  if existing then
    plan[i] = { dup = existing }
  else
    fresh = fresh + 1
    plan[i] = { task = task, payload = ARGV[b + 2], nb = tonumber(ARGV[b + 3]), delay = tonumber(ARGV[b + 4]) }
    if task.idem then seen[task.idem] = task.id end
  end
end
if max_size > 0 then
  local size = ready_count() + redis.call('ZCARD', K_SCHED) + redis.call('ZCARD', K_LEASED)
  if size + fresh > max_size then return { 'full', size } end
end
local reply = { 'ok' }
for i = 1, n do
  local p = plan[i]
  if p.dup then
    local dup = load(p.dup)
    reply[#reply + 1] = p.dup
    reply[#reply + 1] = 1
    reply[#reply + 1] = (dup and dup.st) or 'ready'
  else
    local task = p.task
    task.enq = now
    task.att = 0
    redis.call('HSET', K_PAYLOADS, task.id, p.payload)
    local at = 0
    if p.nb > 0 then at = p.nb end
    if p.delay > 0 then at = now + p.delay end
    if at > now then schedule(task, at) else make_ready(task) end
    save(task)
    if task.idem then
      redis.call('HSET', K_IDEM, task.idem, task.id)
      redis.call('ZADD', K_IDEMX, now + idem_ttl, task.idem)
    end
    reply[#reply + 1] = task.id
    reply[#reply + 1] = 0
    reply[#reply + 1] = task.st
  end
end
if fresh > 0 then count('enqueued', fresh) end
wake_streams()
return reply
