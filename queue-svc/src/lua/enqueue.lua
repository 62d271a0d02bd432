-- enqueue: store a batch of tasks into one queue, all or none.
-- ARGV[1] the call's numbers, as one MessagePack array: max size (0 = unbounded; counts
--         ready + scheduled + leased), idempotency retention (ms), the number of tasks n,
--         then per task: priority (0..4), not-before (ms, 0 = none), delay (ms, 0 = none),
--         the entries of its record's map, and which optional strings follow (1: an
--         idempotency key, 2: a payload kept beside the record; added together). One string,
--         unpacked into Lua numbers, instead of an argument per number that Redis makes an
--         object, then a Lua string, for tonumber to parse.
-- ARGV[2..] per task: its id, its idempotency key if it has one, its payload if it is kept
--         beside the record (over 1 KiB; a smaller one is in the record), then the record: a
--         MessagePack map of the fields the service sets, without the map's one-byte header
--         (its entry count is among the numbers). The script appends what only it knows (enq,
--         att, st, sch) and writes the header with the new count, so a record is never
--         decoded, nor copied to drop its header, here.
-- Returns {'full', size} or {'ok', codes, then per duplicate: its task id and state}, where
-- codes holds one letter per task: 'r' stored ready, 's' stored scheduled, 'd' a duplicate.
-- Why a script: the size check, the idempotency lookups and the writes must be one step.
local v = cmsgpack.unpack(ARGV[1])
local max_size, idem_ttl, n = v[1], v[2], v[3]
local NUMBERS = 5
-- Per task: the id of the task it duplicates, or false.
local plan, fresh, seen = {}, 0, {}
local a = 2
for i = 1, n do
  local c = 3 + (i - 1) * NUMBERS
  local parts = v[c + 5]
  -- Up to 4 entries are appended: the map must stay a fixmap (at most 15 entries).
  if v[c + 4] > 10 then
    return redis.error_reply('enqueue: task ' .. i .. ': the record is not a MessagePack map of at most 10 entries')
  end
  local id, idem = ARGV[a], ''
  a = a + 1
  if parts % 2 == 1 then
    idem = ARGV[a]
    a = a + 1
  end
  if parts >= 2 then a = a + 1 end
  a = a + 1
  local existing = false
  if idem ~= '' then
    existing = seen[idem] or false
    if not existing then
      local old = redis.call('HGET', K_IDEM, idem)
      if old and redis.call('HEXISTS', K_TASKS, old) == 1 then existing = old end
    end
  end
  plan[i] = existing
  if not existing then
    fresh = fresh + 1
    if idem ~= '' then seen[idem] = id end
  end
end
-- The tasks hash holds a record for every ready, scheduled and leased task (and for finished
-- and dead ones): one HLEN settles the common case, a queue far from full, and only a queue
-- that may be near its maximum pays for the exact count (seven reads).
if max_size > 0 and redis.call('HLEN', K_TASKS) + fresh > max_size then
  local size = ready_count() + redis.call('ZCARD', K_SCHED) + redis.call('ZCARD', K_LEASED)
  if size + fresh > max_size then return { 'full', size } end
end
-- The writes are gathered and sent as one command per key, not three or four per task.
local codes, dups, stored, created = {}, {}, {}, {}
-- cmsgpack.pack encodes each of its arguments into a buffer of its own and then joins them:
-- what is the same for every task of the call is packed once, here.
local pack, char = cmsgpack.pack, string.char
local READY = pack('enq', now, 'att', 0, 'st', 'ready')
local payloads, ready, sched, idem, idemx = {}, {}, {}, {}, {}
a = 2
for i = 1, n do
  local c = 3 + (i - 1) * NUMBERS
  local parts = v[c + 5]
  local id, key, payload = ARGV[a], '', false
  a = a + 1
  if parts % 2 == 1 then
    key = ARGV[a]
    a = a + 1
  end
  if parts >= 2 then
    payload = ARGV[a]
    a = a + 1
  end
  local record = ARGV[a]
  a = a + 1
  local dup = plan[i]
  if dup then
    local state = created[dup]
    if not state then
      local task = load(dup)
      state = (task and task.st) or 'ready'
    end
    codes[i] = 'd'
    dups[#dups + 1] = dup
    dups[#dups + 1] = state
  else
    local priority, nb, delay = v[c + 1], v[c + 2], v[c + 3]
    local at = 0
    if nb > 0 then at = nb end
    if delay > 0 then at = now + delay end
    local state, extra, added
    if at > now then
      state, codes[i] = 'scheduled', 's'
      extra, added = pack('enq', now, 'att', 0, 'st', state, 'sch', at), 4
      sched[#sched + 1] = at
      sched[#sched + 1] = id
    else
      state, codes[i] = 'ready', 'r'
      extra, added = READY, 3
      local list = ready[priority]
      if not list then
        list = {}
        ready[priority] = list
      end
      list[#list + 1] = id
      made_ready = made_ready + 1
    end
    -- As save() stores it: the id is the hash field. One concatenation builds the record:
    -- the fixmap header with the new count, the service's entries, the script's.
    stored[#stored + 1] = id
    stored[#stored + 1] = char(0x80 + v[c + 4] + added) .. record .. extra
    if payload then
      payloads[#payloads + 1] = id
      payloads[#payloads + 1] = payload
    end
    created[id] = state
    if key ~= '' then
      idem[#idem + 1] = key
      idem[#idem + 1] = id
      idemx[#idemx + 1] = now + idem_ttl
      idemx[#idemx + 1] = key
    end
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
local reply = { 'ok', table.concat(codes) }
for _, v in ipairs(dups) do reply[#reply + 1] = v end
return reply
