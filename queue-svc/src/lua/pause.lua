-- pause: ARGV[1] '1' pauses (nothing is leased; enqueues are accepted), '0' resumes.
-- Returns the new paused flag.
if ARGV[1] == '1' then redis.call('HSET', K_META, 'paused', '1') else redis.call('HDEL', K_META, 'paused') end
return tonumber(ARGV[1])
