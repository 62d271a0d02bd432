-- retire: whether the queue holds nothing: no task in any state (every index entry names a task
-- of the tasks hash, so an empty hash means empty indexes), no idempotency record, not paused.
-- With ARGV[1] '1', an empty queue's leftover keys go too (its meta hash: per-minute counters,
-- the auto-redrive cursor; stale index entries, should any be left). The reaper asks once
-- without deleting, takes the queue out of the registry only if nothing registered it since
-- its cut-off, then asks again with '1' (see `RedisQueue::retire` in store.rs for why no
-- enqueue can slip between).
-- Returns 1 when the queue is empty, else 0.
if redis.call('HGET', K_META, 'paused') == '1' then return 0 end
if redis.call('HLEN', K_TASKS) > 0 or redis.call('HLEN', K_IDEM) > 0 then return 0 end
if ARGV[1] == '1' then
  redis.call('DEL', unpack(KEYS))
end
return 1
