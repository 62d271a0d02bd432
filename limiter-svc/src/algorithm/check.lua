-- check: evaluate every check of one request, then consume all or nothing.
--
-- KEYS[i]  the counter key of check i (all keys share one hash tag on Redis Cluster).
-- ARGV[1]  mode: "check" (consume when all pass) or "peek" (read only).
-- ARGV[2]  nonce: unique per request; names the sliding-log members this request adds, so a
--          refund can remove exactly them.
-- ARGV[3 + 6*(i-1) ..] per check: algorithm (1-5), limit, window (µs), burst, cost,
--          shadow (1 = report only, never deny).
-- Returns  { all_allowed (0/1), now (µs), then per check: allowed, limit, remaining,
--          reset_after (µs), retry_after (µs) }.
--
-- Why a script: the pass/deny decision of every check and the consumption of all of them must
-- be one atomic step, or two concurrent requests could both see the last unit free; MULTI
-- cannot branch on what it reads. The clock is Redis's TIME, the same for every instance.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode, nonce = ARGV[1], ARGV[2]
local writable = mode == 'check'

local checks, results, all = {}, {}, true
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 6
  local p = {
    alg = tonumber(ARGV[b + 1]),
    limit = tonumber(ARGV[b + 2]),
    window = tonumber(ARGV[b + 3]),
    burst = tonumber(ARGV[b + 4]),
    cost = tonumber(ARGV[b + 5]),
    shadow = ARGV[b + 6] == '1',
  }
  local algorithm = ALGORITHMS[p.alg]
  if not algorithm then
    return redis.error_reply('ERR sluice: unknown algorithm ' .. tostring(ARGV[b + 1]))
  end
  local r = algorithm.peek(KEYS[i], now, p, writable)
  r.limit = r.limit or p.limit
  checks[i], results[i] = p, r
  if r.allowed == 0 and not p.shadow then all = false end
end

local reply = { all and 1 or 0, now }
for i = 1, #KEYS do
  local p, r = checks[i], results[i]
  local consumed = writable and all and r.allowed == 1
  if consumed then
    ALGORITHMS[p.alg].commit(KEYS[i], now, p, r, nonce)
    r.remaining = math.max(0, r.remaining - p.cost)
  end
  reply[#reply + 1] = r.allowed
  reply[#reply + 1] = r.limit
  reply[#reply + 1] = r.remaining
  reply[#reply + 1] = math.max(0, math.ceil(r.reset))
  reply[#reply + 1] = math.max(0, math.ceil(r.retry))
end
return reply
