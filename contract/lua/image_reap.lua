-- reap(KEYS as give_up; ARGV = id, stale before, max attempts, reason): fail ('failed') a running
-- image whose heartbeat is older than ARGV[2], or put it back among the queued ones ('requeue': the
-- caller queues it again; its attempts are kept, so the bound holds); 'alive' when it is not stale
-- (any more).
local id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('SISMEMBER', KEYS[2], id) == 0 then return 'alive' end
if tonumber(redis.call('HGET', KEYS[4], id) or '0') >= tonumber(ARGV[2]) then return 'alive' end
if tonumber(redis.call('HGET', KEYS[7], id) or '0') >= tonumber(ARGV[3]) then
  give_up(id, ARGV[4])
  return 'failed'
end
redis.call('SREM', KEYS[2], id)
redis.call('HDEL', KEYS[4], id)
return 'requeue'
