-- dead: dead-letter operations, bounded by ARGV[2] tasks per call.
-- ARGV[1] op: 'list' | 'redrive' | 'purge'
-- ARGV[2] limit; ARGV[3] (list only) the cursor of the previous page ('<score> <id>' of its
-- last dead letter, '' = the start)
-- ARGV[4] selector: 'id' | 'all' | 'filter'; ARGV[5] task id (id) or category ('' = any);
-- ARGV[6] dead before (ms, 0 = any); ARGV[7] the queue's max size (redrive and auto; 0 =
-- unbounded): redriven tasks count against it, so only as many as fit are moved; ARGV[8]
-- (redrive and purge) the cursor a previous call returned, '' to start at the oldest.
-- list returns {more (0/1), then per task: dead-at score, record JSON, payload}; redrive and
-- purge return {count, more (0/1), cursor score, cursor id} (the cursor to go on from, ''
-- when done), or {-1, max size} for a redrive with no room left while some matched.
-- Redrive resets attempts and makes the task ready again.
-- op 'auto' (the reaper's auto-redrive) takes instead ARGV[4] the categories as ',a,b,',
-- ARGV[5] the cool-down (ms), ARGV[6] the most auto-redrives of one task; see below.
local op, limit = ARGV[1], tonumber(ARGV[2])
local max_size = tonumber(ARGV[7] or '0')
-- How many tasks the queue can still take (-1: unbounded).
local function room()
  if op == 'purge' or op == 'list' or max_size <= 0 then return -1 end
  local size = ready_count() + redis.call('ZCARD', K_SCHED) + redis.call('ZCARD', K_LEASED)
  return math.max(0, max_size - size)
end
if op == 'auto' then
  -- Walks dead letters in the order they died, from a cursor kept in meta, up to those dead a
  -- cool-down ago: each death is looked at once, so a dead letter left dead costs nothing on
  -- later calls. A task dying again gets a later score and is looked at again.
  local categories, cool, most = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local from = tonumber(redis.call('HGET', K_META, 'autocur') or '0')
  local space = room()
  local done = 0
  -- Redrives `id` when it qualifies; false when it qualifies but the queue has no room.
  local function consider(id)
    local task = load(id)
    local e = task and task.err and task.err[#task.err]
    if task and task.st == 'dead' and e and (task.rd or 0) < most
      and string.find(categories, ',' .. e.c .. ',', 1, true) then
      if space >= 0 and done >= space then return false end
      redis.call('ZREM', K_DEAD, id)
      task.att = 0
      task.dd = nil
      task.rd = (task.rd or 0) + 1
      make_ready(task)
      save(task)
      done = done + 1
    end
    return true
  end
  local due = redis.call('ZRANGEBYSCORE', K_DEAD, '(' .. from, now - cool, 'WITHSCORES', 'LIMIT', 0, limit)
  local last, more = from, 0
  for i = 1, #due, 2 do
    local score = tonumber(due[i + 1])
    if not consider(due[i]) then
      -- The queue is full: look at this millisecond again next time.
      last, more = score - 1, 1
      break
    end
    last = score
  end
  if more == 0 and #due == 2 * limit then
    more = 1
    -- More dead letters of the last millisecond may lie beyond the limit: take all of that
    -- millisecond now (one reaper pass dead-letters at most a few hundred at once), so the
    -- cursor can pass it without skipping any.
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_DEAD, last, last)) do
      if not consider(id) then
        last = last - 1
        break
      end
    end
  end
  redis.call('HSET', K_META, 'autocur', last)
  wake_streams()
  return { done, more }
end
local selector, arg, before = ARGV[4], ARGV[5], tonumber(ARGV[6])
local function matches(task)
  if selector == 'all' then return true end
  if selector == 'id' then return task.id == arg end
  if arg ~= '' then
    local last = task.err and task.err[#task.err]
    if not last or last.c ~= arg then return false end
  end
  if before > 0 and (task.dd or 0) >= before then return false end
  return true
end
-- Redrive and purge look at most SCAN dead letters per call, oldest dead first, from the
-- cursor ARGV[8] ('<score> <id>' of the last one a previous call looked at; '' = the start),
-- so a filter matching few of many dead letters costs a bounded amount per call.
local SCAN = 10000
local space = room()
local done, more, blocked = 0, 0, false
local at_score, at_id = '', ''
-- a > b, byte by byte (the order of a sorted set's members of equal score).
local function after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end
if op == 'list' then
  -- Up to `limit` dead letters after the cursor ARGV[3] (as below), oldest dead first. A
  -- cursor is a position, so dead letters redriven or purged between pages shift nothing.
  local from_score, from_id = string.match(ARGV[3] or '', '^(%d+) (.+)$')
  local ties = 0
  if from_score then ties = redis.call('ZCOUNT', K_DEAD, from_score, from_score) end
  local found = redis.call('ZRANGEBYSCORE', K_DEAD, from_score or '-inf', '+inf', 'WITHSCORES', 'LIMIT', 0, limit + ties + 1)
  local out = { 0 }
  local taken = 0
  for i = 1, #found, 2 do
    if not from_score or found[i + 1] ~= from_score or after(found[i], from_id) then
      if taken == limit then
        out[1] = 1
        break
      end
      taken = taken + 1
      local task = load(found[i])
      if task then
        out[#out + 1] = found[i + 1]
        out[#out + 1] = encode(task)
        out[#out + 1] = payload_of(task)
      end
    end
  end
  return out
end
local candidates = {}
if selector == 'id' then
  candidates = { arg, '0' }
else
  local from_score, from_id = string.match(ARGV[8] or '', '^(%d+) (.+)$')
  local high = '+inf'
  if before > 0 then high = '(' .. before end
  local found = redis.call('ZRANGEBYSCORE', K_DEAD, from_score or '-inf', high, 'WITHSCORES', 'LIMIT', 0, SCAN)
  for i = 1, #found, 2 do
    -- Past the cursor: a later score, or the same score and a later id (ties sort by id).
    if not from_score or found[i + 1] ~= from_score or after(found[i], from_id) then
      candidates[#candidates + 1] = found[i]
      candidates[#candidates + 1] = found[i + 1]
    end
  end
  if #found == 2 * SCAN then more = 1 end
end
for i = 1, #candidates, 2 do
  local id = candidates[i]
  local task = load(id)
  if task and task.st == 'dead' and matches(task) then
    if done >= limit or (space >= 0 and done >= space) then
      more = 1
      blocked = space >= 0 and done >= space
      break
    end
    redis.call('ZREM', K_DEAD, id)
    if op == 'redrive' then
      task.att = 0
      task.dd = nil
      make_ready(task)
      save(task)
    else
      redis.call('HDEL', K_TASKS, id)
      redis.call('HDEL', K_PAYLOADS, id)
      redis.call('HDEL', K_RESULTS, id)
    end
    done = done + 1
  end
  at_score, at_id = candidates[i + 1], id
end
if done == 0 and blocked then return { -1, max_size } end
wake_streams()
if more == 0 or selector == 'id' then at_score, at_id = '', '' end
return { done, more, at_score, at_id }
