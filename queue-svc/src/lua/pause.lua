-- pause: ARGV[1] '1' pauses (nothing is leased; enqueues are accepted), '0' resumes; a resumed
-- queue announces its ready tasks, so idle Lease streams of every instance look at once.
-- Returns the new paused flag.
if ARGV[1] == '1' then
  redis.call('HSET', K_META, 'paused', '1')
else
  redis.call('HDEL', K_META, 'paused')
  made_ready = ready_count()
  wake_streams()
end
return tonumber(ARGV[1])
