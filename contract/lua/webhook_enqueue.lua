-- enqueue(KEYS = claim, deliveries, outbox; ARGV = id, record, due, ttl): claim the job's one
-- delivery; 0 when it was claimed before.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[4]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
