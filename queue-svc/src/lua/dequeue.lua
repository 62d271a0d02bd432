-- dequeue: lease up to n ready tasks, most urgent priority first, FIFO within a priority.
-- ARGV[1] n; ARGV[2] lease (ms; 0 = each task's processing timeout); ARGV[3] worker id;
-- ARGV[4 ..] n lease tokens (made by the caller, one per possible lease).
-- Returns a flat list: per leased task its id, its record as stored (MessagePack: the bytes
-- save() wrote, so nothing is encoded twice) and its payload, or nil when the payload is in the
-- record (field pl). A paused queue
-- leases nothing. Due scheduled tasks are promoted first, so delays hold to the millisecond;
-- when it leased all it asked for, some it promoted may still be ready, and are announced to
-- the Lease streams.
local n, lease, worker = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
if redis.call('HGET', K_META, 'paused') == '1' then return {} end
promote(1000)
local out = {}
local leased = 0
local p = 0
while leased < n and p <= 4 do
  local id = redis.call('LPOP', ready_key(p))
  if not id then
    p = p + 1
  else
  local task = load(id)
  if task and task.st == 'ready' then
    leased = leased + 1
    task.att = task.att + 1
    task.st = 'leased'
    task.lsd = now
    task.tok = ARGV[3 + leased]
    local ms = lease
    if ms <= 0 then ms = task.to end
    task.dl = now + ms
    task.wk = worker
    redis.call('ZADD', K_LEASED, task.dl, task.id)
    out[#out + 1] = task.id
    out[#out + 1] = save(task)
    if task.pl then
      out[#out + 1] = false
    else
      out[#out + 1] = payload_of(task)
    end
  end
  end
end
if leased >= n then wake_streams() end
return out
