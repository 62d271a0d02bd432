-- head: the most urgent ready priority of the queue, after promoting due scheduled tasks.
-- Returns the stored priority (0 critical .. 4 background), or -1 when nothing is ready or
-- the queue is paused. Used to serve several projects' queues in turn (see Dequeue). Tasks it
-- promotes are announced to the Lease streams.
if redis.call('HGET', K_META, 'paused') == '1' then return -1 end
promote(1000)
wake_streams()
for p = 0, 4 do
  if redis.call('LLEN', ready_key(p)) > 0 then return p end
end
return -1
