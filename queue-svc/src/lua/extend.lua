-- extend: push live leases' deadlines to at least now + ARGV[2] ms (never shortens one). One
-- call extends a batch (a heartbeat's tasks of one queue); each task is judged on its own.
-- ARGV[1] n; ARGV[2] ms; then per task 2 args: task id, lease token.
-- Returns per task three entries: 'ok', the deadline and cancel requested (0/1); 'nf', '', 0
-- (no such task); or 'stale', its state, 0 (the token is not the live lease).
local n, by = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, n do
  local b = 2 + (i - 1) * 2
  local id, token = ARGV[b + 1], ARGV[b + 2]
  local task = load(id)
  if not task then
    out[#out + 1] = 'nf'
    out[#out + 1] = ''
    out[#out + 1] = 0
  elseif task.st ~= 'leased' or task.tok ~= token or task.dl < now then
    out[#out + 1] = 'stale'
    out[#out + 1] = task.st
    out[#out + 1] = 0
  else
    task.dl = math.max(task.dl, now + by)
    redis.call('ZADD', K_LEASED, task.dl, id)
    save(task)
    out[#out + 1] = 'ok'
    out[#out + 1] = task.dl
    out[#out + 1] = task.cr and 1 or 0
  end
end
return out
