-- fail: a leased task's attempt failed, fenced by its lease token.
-- ARGV[1] task id; ARGV[2] lease token; ARGV[3] category; ARGV[4] message;
-- ARGV[5] retryable ('1' / '0').
-- Returns {'retry', at, attempt}, {'dead', 0, attempt}, {'cancelled', 0, attempt}, {'nf'} or
-- {'stale', state}.
local id, token, category, message, retryable = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
local task = load(id)
if not task then return { 'nf' } end
if task.st ~= 'leased' or task.tok ~= token or task.dl < now then return { 'stale', task.st } end
local outcome = fail_attempt(task, category, message, retryable)
save(task)
return { outcome, task.sch or 0, task.att }
