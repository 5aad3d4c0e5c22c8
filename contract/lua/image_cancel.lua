-- cancel(KEYS = job, order, running, done, failed, skipped, stats): flag the job and move every
-- image that has not started to skipped, in one step; -1 when Redis no longer has the job.
local job, order, running, done, failed, skipped = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', job) == 0 then return -1 end
redis.call('HSET', job, 'cancelled', '1')
local n = 0
for _, id in ipairs(redis.call('LRANGE', order, 0, -1)) do
  if redis.call('SISMEMBER', running, id) == 0 and redis.call('SISMEMBER', done, id) == 0
     and redis.call('HEXISTS', failed, id) == 0 and redis.call('SADD', skipped, id) == 1 then
    n = n + 1
  end
end
redis.call('HINCRBY', KEYS[7], 'images_skipped', n)
return n
