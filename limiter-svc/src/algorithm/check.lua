-- check: evaluate the checks of one or more requests; each request consumes all or nothing.
--
-- KEYS     the requests' counter keys, request after request, check after check (on Redis
--          Cluster every key of a call shares one hash slot).
-- ARGV[1]  number of requests R; then per request: mode ("check": consume when all its checks
--          pass; "peek": read only), nonce (unique per request; names the sliding-log members
--          it adds, so a refund can remove exactly them), number of checks n, then per check:
--          algorithm (1-5), limit, window (µs), burst, cost, shadow (1 = report only).
-- Returns  { now (µs), then per request: all_allowed (0/1), then per check: allowed, limit,
--          remaining, reset_after (µs), retry_after (µs) }.
--
-- Why a script: the pass/deny decision of every check of a request and the consumption of all
-- of them must be one atomic step, or two concurrent requests could both see the last unit
-- free; MULTI cannot branch on what it reads. Requests of one call are evaluated in order, each
-- seeing what the ones before it consumed, exactly as separate calls in that order would. The
-- clock is Redis's TIME, the same for every instance.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local reply = { now }

-- Every algorithm is known before anything is consumed, so a bad one fails the call whole.
local a = 2
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a + 2])
  a = a + 3
  for _ = 1, n do
    if not ALGORITHMS[tonumber(ARGV[a])] then
      return redis.error_reply('ERR sluice: unknown algorithm ' .. tostring(ARGV[a]))
    end
    a = a + 6
  end
end

local k
a, k = 2, 0

for _ = 1, tonumber(ARGV[1]) do
  local writable, nonce, n = ARGV[a] == 'check', ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  local checks, results, all = {}, {}, true
  for i = 1, n do
    local p = {
      alg = tonumber(ARGV[a]),
      limit = tonumber(ARGV[a + 1]),
      window = tonumber(ARGV[a + 2]),
      burst = tonumber(ARGV[a + 3]),
      cost = tonumber(ARGV[a + 4]),
      shadow = ARGV[a + 5] == '1',
    }
    a = a + 6
    local r = ALGORITHMS[p.alg].peek(KEYS[k + i], now, p, writable)
    r.limit = r.limit or p.limit
    checks[i], results[i] = p, r
    if r.allowed == 0 and not p.shadow then all = false end
  end

  reply[#reply + 1] = all and 1 or 0
  for i = 1, n do
    local p, r = checks[i], results[i]
    if writable and all and r.allowed == 1 then
      ALGORITHMS[p.alg].commit(KEYS[k + i], now, p, r, nonce)
      r.remaining = math.max(0, r.remaining - p.cost)
    end
    reply[#reply + 1] = r.allowed
    reply[#reply + 1] = r.limit
    reply[#reply + 1] = r.remaining
    reply[#reply + 1] = math.max(0, math.ceil(r.reset))
    reply[#reply + 1] = math.max(0, math.ceil(r.retry))
  end
  k = k + n
end
return reply
