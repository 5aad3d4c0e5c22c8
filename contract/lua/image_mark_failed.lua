-- mark_failed(KEYS = job, running, failed, beat, done, stats, then every key of the job; ARGV = id,
-- error, ttl): nothing when Redis no longer has the job; a failure never overrides a success.
local job, running, failed, beat, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('EXISTS', job) == 0 or redis.call('SISMEMBER', done, ARGV[1]) == 1 then return 0 end
redis.call('SREM', running, ARGV[1])
redis.call('HDEL', beat, ARGV[1])
redis.call('HSET', failed, ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[6], 'images_failed', 1)
for i = 7, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
