-- common: prepended to every queue script. Every script receives the same fifteen keys, all
-- of one queue and one hash tag {<project>/<queue>}, so every script runs on Redis Cluster.
--   KEYS[1]  tasks     hash: task id -> task record (MessagePack, short field names, without
--                      the id; dequeue answers with it as stored, the others with JSON). A
--                      payload of up to 1 KiB is kept in the record itself (field pl; the
--                      service writes it there, see store.rs INLINE_PAYLOAD)
--   KEYS[2]  payloads  hash: task id -> payload bytes, for larger payloads
--   KEYS[3]  sched     zset: task id, score = ms when it becomes ready (delays, retries)
--   KEYS[4]  leased    zset: task id, score = lease deadline (ms)
--   KEYS[5]  dead      zset: task id, score = ms it was dead-lettered
--   KEYS[6]  done      zset: task id, score = ms it finished (succeeded, cancelled): retention
--   KEYS[7]  idem      hash: idempotency key -> task id
--   KEYS[8]  idemx     zset: idempotency key, score = ms it expires
--   KEYS[9]  meta      hash: paused, per-minute counters, cancelled tasks retained
--   KEYS[10] results   hash: task id -> result bytes
--   KEYS[11..15] ready0..ready4  lists of ready task ids per priority (0 critical .. 4
--            background), oldest first: a list entry costs far less memory than a sorted-set one.
-- The clock is Redis's TIME, in milliseconds.
local K_TASKS, K_PAYLOADS, K_SCHED, K_LEASED, K_DEAD = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_DONE, K_IDEM, K_IDEMX, K_META, K_RESULTS = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local function ready_key(p) return KEYS[11 + p] end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local MAX_ERRORS = 10

-- Stored records are MessagePack: smaller than JSON and cheaper to decode and encode, which is
-- most of a script's work. Records stored as JSON (by earlier versions; they start with '{',
-- which no MessagePack map does) are still read, and written back as MessagePack.
local function load(id)
  local raw = redis.call('HGET', K_TASKS, id)
  if not raw then return nil end
  local task
  if string.byte(raw, 1) == 123 then task = cjson.decode(raw) else task = cmsgpack.unpack(raw) end
  task.id = id
  return task
end

-- The id is the hash field: the stored record leaves it out. Returns the record as stored.
local function save(task)
  local id = task.id
  task.id = nil
  local packed = cmsgpack.pack(task)
  redis.call('HSET', K_TASKS, id, packed)
  task.id = id
  return packed
end

-- The record as the service reads it (with its id, without the payload).
local function encode(task)
  local pl = task.pl
  task.pl = nil
  local json = cjson.encode(task)
  task.pl = pl
  return json
end

-- The task's payload: in its record, or beside it.
local function payload_of(task)
  return task.pl or redis.call('HGET', K_PAYLOADS, task.id) or ''
end

-- Sends `command key args...` for a flat list of arguments gathered by a batch (field-value
-- or score-member pairs), in chunks of 1,000: Lua's unpack has a stack limit. Nothing for an
-- empty list.
local function send_all(command, key, args)
  local n = #args
  local i = 1
  while i <= n do
    local j = math.min(n, i + 999)
    redis.call(command, key, unpack(args, i, j))
    i = j + 1
  end
end

-- Ready tasks in all priority lists.
local function ready_count()
  local n = 0
  for p = 0, 4 do n = n + redis.call('LLEN', ready_key(p)) end
  return n
end

-- Per-minute counters in meta: `<what>:<minute>`, and `<what>:last`, the minute last counted.
-- Only the last counted minute and the one before it are kept (stats reads the current and
-- the previous minute): when a new minute is counted, the fields older than the minute
-- before it go, however long the counter sat idle, so the hash cannot grow.
local function count(what, by)
  local minute = math.floor(now / 60000)
  local stamp = what .. ':last'
  local last = tonumber(redis.call('HGET', K_META, stamp))
  if last ~= minute then
    if last then
      redis.call('HDEL', K_META, what .. ':' .. (last - 1))
      if last ~= minute - 1 then redis.call('HDEL', K_META, what .. ':' .. last) end
    else
      -- No stamp yet: a new counter, or one counted by an earlier version, which left a
      -- field behind for every idle gap. Those go once, here.
      local pattern = '^' .. what .. ':(%d+)$'
      for _, field in ipairs(redis.call('HKEYS', K_META)) do
        local m = tonumber(string.match(field, pattern))
        if m and m ~= minute and m ~= minute - 1 then redis.call('HDEL', K_META, field) end
      end
    end
    redis.call('HSET', K_META, stamp, minute)
  end
  redis.call('HINCRBY', K_META, what .. ':' .. minute, by or 1)
end

-- Tasks made ready by this call; announced once at the end (see wake_streams).
local made_ready = 0

local function make_ready(task)
  task.st = 'ready'
  redis.call('RPUSH', ready_key(task.p), task.id)
  made_ready = made_ready + 1
end

-- Tells every queue-svc instance (pub/sub, not a key) how many tasks became ready, so their
-- idle Lease streams wake at once. Scripts that make tasks ready call it before returning.
local function wake_streams()
  if made_ready > 0 then redis.call('PUBLISH', 'sluice:q:wake', made_ready) end
end

local function schedule(task, at)
  task.st = 'scheduled'
  task.sch = at
  redis.call('ZADD', K_SCHED, at, task.id)
end

-- Finished tasks (succeeded or cancelled) wait out their retention in `done`; meta's
-- `cancelled` counts the cancelled among them, so stats can tell the two apart. A task counted
-- there is marked (`cc`), so that retention takes off only what was counted (tasks cancelled
-- by earlier versions were not).
local function finish(task, state)
  task.st = state
  task.ltok = task.tok
  task.tok = nil
  redis.call('ZREM', K_LEASED, task.id)
  redis.call('ZADD', K_DONE, now, task.id)
  if state == 'cancelled' then
    task.cc = 1
    redis.call('HINCRBY', K_META, 'cancelled', 1)
  end
end

local function dead_letter(task)
  task.st = 'dead'
  task.dd = now
  task.ltok = task.tok
  task.tok = nil
  redis.call('ZREM', K_LEASED, task.id)
  redis.call('ZADD', K_DEAD, now, task.id)
  count('dead')
end

-- Moves up to `limit` scheduled tasks whose time has come to ready.
local function promote(limit)
  local due = redis.call('ZRANGEBYSCORE', K_SCHED, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', K_SCHED, id)
    local task = load(id)
    if task and task.st == 'scheduled' then
      make_ready(task)
      save(task)
    end
  end
  return #due
end

-- A failed attempt (by the worker, or its lease expiring): record the error, then retry
-- after the task's backoff for this attempt, or dead-letter it. Returns the outcome.
local function fail_attempt(task, category, message, retryable)
  local errors = task.err or {}
  errors[#errors + 1] = { a = task.att, c = category, m = message, r = retryable, t = now }
  while #errors > MAX_ERRORS do table.remove(errors, 1) end
  task.err = errors
  task.fl = now
  task.dl = nil
  count('failed')
  if task.cr then
    finish(task, 'cancelled')
    task.cx = now
    return 'cancelled'
  end
  if not retryable or category == 'permanent' or task.att >= task.max then
    dead_letter(task)
    return 'dead'
  end
  task.ltok = task.tok
  task.tok = nil
  redis.call('ZREM', K_LEASED, task.id)
  local delays = task.dly or {}
  local delay = delays[task.att] or delays[#delays] or 0
  schedule(task, now + delay)
  return 'retry'
end
