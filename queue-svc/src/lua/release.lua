-- release: give a leased task back unstarted, fenced by its lease token; the attempt does not
-- count. ARGV[1] task id; ARGV[2] lease token.
-- Returns {'ok'}, {'nf'} or {'stale', state}.
local id, token = ARGV[1], ARGV[2]
local task = load(id)
if not task then return { 'nf' } end
if task.st ~= 'leased' or task.tok ~= token or task.dl < now then return { 'stale', task.st } end
redis.call('ZREM', K_LEASED, id)
task.att = math.max(0, task.att - 1)
task.tok = nil
task.dl = nil
if task.cr then
  finish(task, 'cancelled')
  task.cx = now
else
  make_ready(task)
end
save(task)
wake_streams()
return { 'ok' }
