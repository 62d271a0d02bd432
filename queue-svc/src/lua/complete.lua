-- complete: finish leased tasks as succeeded, each fenced by its lease token. One call
-- completes a batch (a Lease stream's completions, or concurrent unary Completes, that
-- arrived together); each task is judged on its own.
-- ARGV[1] n, then per task 3 args: task id, lease token, result bytes.
-- Returns per task two entries: 'ok' and its run ms (since the lease began; -1 for a repeat),
-- 'nf' and '' (no such task), or 'stale' and its state (the token is not the live lease).
-- A repeated Complete with the token that succeeded the task answers ok again.
local n = tonumber(ARGV[1])
local out = {}
local completed = 0
for i = 1, n do
  local b = 1 + (i - 1) * 3
  local id, token, result = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
  local task = load(id)
  if not task then
    out[#out + 1] = 'nf'
    out[#out + 1] = ''
  elseif task.st == 'succeeded' and task.ltok == token then
    out[#out + 1] = 'ok'
    out[#out + 1] = -1
  elseif task.st ~= 'leased' or task.tok ~= token or task.dl < now then
    out[#out + 1] = 'stale'
    out[#out + 1] = task.st
  else
    finish(task, 'succeeded')
    task.ok = now
    task.dl = nil
    if #result > 0 then redis.call('HSET', K_RESULTS, id, result) end
    completed = completed + 1
    save(task)
    out[#out + 1] = 'ok'
    out[#out + 1] = now - (task.lsd or now)
  end
end
if completed > 0 then count('completed', completed) end
return out
