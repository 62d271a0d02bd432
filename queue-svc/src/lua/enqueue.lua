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
-- The writes are gathered and sent as one command per key, not three or four per task.
local reply, stored, created = { 'ok' }, {}, {}
local payloads, ready, sched, idem, idemx = {}, {}, {}, {}, {}
for i = 1, n do
  local p = plan[i]
  if p.dup then
    local state = created[p.dup]
    if not state then
      local dup = load(p.dup)
      state = (dup and dup.st) or 'ready'
    end
    reply[#reply + 1] = p.dup
    reply[#reply + 1] = 1
    reply[#reply + 1] = state
  else
    local task = p.task
    local id = task.id
    task.enq = now
    task.att = 0
    payloads[#payloads + 1] = id
    payloads[#payloads + 1] = p.payload
    local at = 0
    if p.nb > 0 then at = p.nb end
    if p.delay > 0 then at = now + p.delay end
    if at > now then
      task.st = 'scheduled'
      task.sch = at
      sched[#sched + 1] = at
      sched[#sched + 1] = id
    else
      task.st = 'ready'
      local list = ready[task.p]
      if not list then
        list = {}
        ready[task.p] = list
      end
      list[#list + 1] = id
      made_ready = made_ready + 1
    end
    -- As save() stores it: the id is the hash field.
    task.id = nil
    stored[#stored + 1] = id
    stored[#stored + 1] = cmsgpack.pack(task)
    created[id] = task.st
    if task.idem then
      idem[#idem + 1] = task.idem
      idem[#idem + 1] = id
      idemx[#idemx + 1] = now + idem_ttl
      idemx[#idemx + 1] = task.idem
    end
    reply[#reply + 1] = id
    reply[#reply + 1] = 0
    reply[#reply + 1] = task.st
  end
end
send_all('HSET', K_PAYLOADS, payloads)
send_all('HSET', K_TASKS, stored)
for priority = 0, 4 do
  if ready[priority] then send_all('RPUSH', ready_key(priority), ready[priority]) end
end
send_all('ZADD', K_SCHED, sched)
send_all('HSET', K_IDEM, idem)
send_all('ZADD', K_IDEMX, idemx)
if fresh > 0 then count('enqueued', fresh) end
wake_streams()
return reply
