-- check: evaluate the checks of one or more requests; each request consumes all or nothing.
--
-- KEYS     the requests' counter keys, request after request, check after check (on Redis
--          Cluster every key of a call shares one hash slot).
-- ARGV[1]  nonce prefix: request r's nonce is `<prefix>.<seq of r>`; it names the
--          sliding-log members r adds, so a refund can remove exactly them.
-- ARGV[2]  every number of the call, as one MessagePack array: the number of limits L, then
--          per limit: algorithm (1-5), limit, window (µs), burst, shadow (1 = report only);
--          then the number of requests R, then per request: consume (1: consume when all its
--          checks pass; 0: read only), seq, number of checks n, then per check: the position
--          of its limit (1..L), cost. Checks name their limit by position, so a limit many
--          requests share travels once. One string instead of a Redis argument per number:
--          Redis makes each argument an object and a Lua string, and `tonumber` parses it
--          with strtod; unpacking gives Lua numbers directly.
-- Returns  { now (µs), then per request: all_allowed (0/1), then per check: allowed, limit,
--          remaining, reset_after (µs), retry_after (µs) }, packed as one MessagePack array:
--          parsing one bulk string costs the service far less than parsing six integers
--          per check as separate RESP values.
--
-- Why a script: the pass/deny decision of every check of a request and the consumption of all
-- of them must be one atomic step, or two concurrent requests could both see the last unit
-- free; MULTI cannot branch on what it reads. Requests of one call are evaluated in order, each
-- seeing what the ones before it consumed, exactly as separate calls in that order would. The
-- clock is Redis's TIME, the same for every instance.
--
-- Its cost is most of Redis's work per check, so the loop keeps per-check tables out: an
-- algorithm's peek returns its answer and commit's state as values, kept in arrays reused
-- from request to request.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local v = cmsgpack.unpack(ARGV[2])

-- Every algorithm is known before anything is consumed, so a bad one fails the call whole.
local limits, a = {}, 2
for i = 1, v[1] do
  local algorithm = ALGORITHMS[v[a]]
  if not algorithm then
    return redis.error_reply('ERR sluice: unknown algorithm ' .. tostring(v[a]))
  end
  limits[i] = {
    algorithm = algorithm,
    limit = v[a + 1],
    window = v[a + 2],
    burst = v[a + 3],
    shadow = v[a + 4] == 1,
  }
  a = a + 5
end

local reply, m, k = { now }, 1, 0
-- Per check of the current request: its limit and cost, the peek's answer, commit's state.
local ps, costs, allowed, limit, remaining, reset, retry, s1, s2, s3 = {}, {}, {}, {}, {}, {}, {}, {}, {}, {}
local requests = v[a]
a = a + 1
for _ = 1, requests do
  local writable, seq, n = v[a] == 1, v[a + 1], v[a + 2]
  a = a + 3
  local all = true
  for i = 1, n do
    local p, cost = limits[v[a]], v[a + 1]
    a = a + 2
    ps[i], costs[i] = p, cost
    allowed[i], limit[i], remaining[i], reset[i], retry[i], s1[i], s2[i], s3[i] =
      p.algorithm.peek(KEYS[k + i], now, p, cost, writable)
    if allowed[i] == 0 and not p.shadow then all = false end
  end

  m = m + 1
  reply[m] = all and 1 or 0
  local commit = writable and all
  for i = 1, n do
    local left, until_reset = remaining[i], reset[i]
    if commit and allowed[i] == 1 then
      local algorithm = ps[i].algorithm
      -- Only the sliding log names what it adds; the others are spared making the string.
      local nonce = algorithm.named and (ARGV[1] .. '.' .. int(seq)) or nil
      until_reset = algorithm.commit(KEYS[k + i], now, ps[i], costs[i], nonce, s1[i], s2[i], s3[i])
      left = left - costs[i]
      if left < 0 then left = 0 end
    end
    reply[m + 1] = allowed[i]
    reply[m + 2] = limit[i]
    reply[m + 3] = left
    reply[m + 4] = until_reset > 0 and ceil(until_reset) or 0
    reply[m + 5] = retry[i] > 0 and ceil(retry[i]) or 0
    m = m + 5
  end
  k = k + n
end
return cmsgpack.pack(reply)
