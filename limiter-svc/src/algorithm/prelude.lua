local ALGORITHMS = {}
-- Library functions the checks call, as locals: a global lookup costs a table access each time.
local floor, ceil, max, min, format = math.floor, math.ceil, math.max, math.min, string.format
-- A whole number as a Redis argument. Redis 7.0 formats a Lua number it is given with
-- "%.17g", which was the costliest step of a check; "%d" costs a fraction of it.
local function int(n)
  return format('%d', n)
end
-- A non-negative number as a Redis argument, to the millionth, by the same cheap route.
-- Exact for GCRA's arrival times: doubles of that size (µs since the epoch) are multiples of
-- 1/4.
local function decimal(x)
  local whole = floor(x)
  local millionths = floor((x - whole) * 1000000 + 0.5)
  if millionths >= 1000000 then
    whole, millionths = whole + 1, millionths - 1000000
  end
  return format('%d.%06d', whole, millionths)
end
