-- get: one task's record, payload and result. ARGV[1] task id.
-- Returns {} when unknown, else {record JSON, payload, result}.
local id = ARGV[1]
local task = load(id)
if not task then return {} end
return { encode(task), payload_of(task), redis.call('HGET', K_RESULTS, id) or '' }
