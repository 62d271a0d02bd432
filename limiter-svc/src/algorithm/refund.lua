-- refund: give back what one slot's `check` consumed, when another slot of the same request
-- denied (Redis Cluster only; see README "All or nothing on Redis Cluster").
--
-- KEYS[i]  as in check.
-- ARGV[1]  nonce of the request being refunded.
-- ARGV[2]  `now` that check returned (µs): window-based counters refund only within that window.
-- ARGV[3 + 5*(i-1) ..] per check: algorithm, limit, window (µs), burst, cost.
-- Returns  the number of checks refunded.
local nonce, now = ARGV[1], tonumber(ARGV[2])
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 5
  local p = {
    limit = tonumber(ARGV[b + 2]),
    window = tonumber(ARGV[b + 3]),
    burst = tonumber(ARGV[b + 4]),
  }
  ALGORITHMS[tonumber(ARGV[b + 1])].refund(KEYS[i], now, p, tonumber(ARGV[b + 5]), nonce)
end
return #KEYS
