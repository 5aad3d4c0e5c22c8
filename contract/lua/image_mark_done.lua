-- mark_done(KEYS = job, running, failed, done, results, stats, then every key of the job's images;
-- ARGV = id, result, seconds ('' when reused), ttl): nothing when Redis no longer has the job (it
-- expired or was lost), so no partial job is ever recreated.
local job, running, failed, done, results = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('EXISTS', job) == 0 then return 0 end
local id = ARGV[1]
redis.call('SREM', running, id)
redis.call('HDEL', failed, id)
redis.call('SADD', done, id)
redis.call('HSET', results, id, ARGV[2])
if ARGV[3] == '' then
  redis.call('HINCRBY', KEYS[6], 'images_reused', 1)
else
  redis.call('HINCRBYFLOAT', job, 'seconds_sum', ARGV[3])
  redis.call('HINCRBY', KEYS[6], 'images_done', 1)
  redis.call('HINCRBYFLOAT', KEYS[6], 'image_seconds_sum', ARGV[3])
end
for i = 7, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
