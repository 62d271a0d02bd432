-- complete: finish a leased task as succeeded, fenced by its lease token.
-- ARGV[1] task id; ARGV[2] lease token; ARGV[3] result bytes.
-- Returns {'ok', run ms (since the lease began; -1 for a repeat)}, {'nf'} (no such task) or
-- {'stale', state} (the token is not the live lease).
-- A repeated Complete with the token that succeeded the task answers ok again.
local id, token, result = ARGV[1], ARGV[2], ARGV[3]
local task = load(id)
if not task then return { 'nf' } end
if task.st == 'succeeded' and task.ltok == token then return { 'ok', -1 } end
if task.st ~= 'leased' or task.tok ~= token or task.dl < now then return { 'stale', task.st } end
finish(task, 'succeeded')
task.ok = now
task.dl = nil
if #result > 0 then redis.call('HSET', K_RESULTS, id, result) end
count('completed')
save(task)
return { 'ok', now - (task.lsd or now) }
