-- extend: push a live lease's deadline to at least now + ARGV[3] ms (never shortens it).
-- ARGV[1] task id; ARGV[2] lease token; ARGV[3] ms.
-- Returns {'ok', deadline, cancel requested (0/1)}, {'nf'} or {'stale', state}.
local id, token, by = ARGV[1], ARGV[2], tonumber(ARGV[3])
local task = load(id)
if not task then return { 'nf' } end
if task.st ~= 'leased' or task.tok ~= token or task.dl < now then return { 'stale', task.st } end
task.dl = math.max(task.dl, now + by)
redis.call('ZADD', K_LEASED, task.dl, id)
save(task)
return { 'ok', task.dl, task.cr and 1 or 0 }
