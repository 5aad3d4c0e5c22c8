-- update(KEYS[1]=job hash, ARGV = ttl, field, value, field, value, ...): write the fields only while
-- the job exists, so that no progress or state write recreates a job Redis lost (an ownerless record).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
