-- mark_failed(KEYS = job, running, failed, done, stats, then every key of the job's images; ARGV =
-- id, error, ttl): nothing when Redis no longer has the job; a failure never overrides a success.
local job, running, failed, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', job) == 0 or redis.call('SISMEMBER', done, ARGV[1]) == 1 then return 0 end
redis.call('SREM', running, ARGV[1])
redis.call('HSET', failed, ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[5], 'images_failed', 1)
for i = 6, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
