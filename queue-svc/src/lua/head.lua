-- head: the most urgent ready priority of the queue, after promoting due scheduled tasks.
-- Returns the stored priority (0 critical .. 4 background), or -1 when nothing is ready or
-- the queue is paused. Used to serve several projects' queues in turn (see Dequeue).
if redis.call('HGET', K_META, 'paused') == '1' then return -1 end
promote(1000)
local head = redis.call('ZRANGE', K_READY, 0, 0, 'WITHSCORES')
if #head == 0 then return -1 end
return math.floor(tonumber(head[2]) / PRIORITY_SPAN)
