-- cancel: scheduled and ready tasks become cancelled; a leased one is marked so its worker
-- learns on its next heartbeat (and a later fail or expiry ends it cancelled).
-- ARGV[1] task id. Returns {'cancelled'}, {'requested'}, {'nf'} or {'final', state}.
local id = ARGV[1]
local task = load(id)
if not task then return { 'nf' } end
if task.st == 'scheduled' or task.st == 'ready' then
  redis.call('ZREM', K_SCHED, id)
  if task.st == 'ready' then redis.call('LREM', ready_key(task.p), 1, id) end
  finish(task, 'cancelled')
  task.cx = now
  save(task)
  return { 'cancelled' }
end
if task.st == 'leased' then
  task.cr = true
  save(task)
  return { 'requested' }
end
return { 'final', task.st }
