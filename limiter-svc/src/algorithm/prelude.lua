local ALGORITHMS = {}
-- Library functions the checks call, as locals: a global lookup costs a table access each time.
local floor, ceil, max, min, format = math.floor, math.ceil, math.max, math.min, string.format
-- A whole number as a Redis argument. Redis 7.0 formats a Lua number it is given with
-- "%.17g", which was the costliest step of a check; "%d" costs a fraction of it.
local function int(n)
  return format('%d', n)
end
-- Least time (ms) a GCRA or token-bucket key is kept after a write. Their state is empty again
-- (the TAT passed, the bucket refilled) after cost x the emission interval, which for a subject
-- far below its limit is microseconds: keys that short-lived made every check a lookup miss, a
-- delete and a create, and kept Redis's expiry cycles busy for milliseconds at a time. A state
-- past its time reads as empty, so keeping it longer changes no answer; a subject that comes
-- back within this time overwrites its key in place.
local KEEP_MS = 1000
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
