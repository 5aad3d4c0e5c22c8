-- begin(KEYS = job, running, done, failed, skipped, attempts, stats; ARGV = id, now, max attempts): one
-- image of a chunk being run starts. 'missing' (Redis lost the job), 'finished' (done, failed or
-- skipped already: a chunk delivered again skips it), 'skipped' (the job is cancelled and the image
-- had not started), 'exhausted' (its worker died on it on every one of its attempts: the caller
-- fails it alone, and the rest of its chunk goes on) or 'run' (now running, its attempt counted).
local job, running, done, failed, skipped = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id = ARGV[1]
if redis.call('EXISTS', job) == 0 then return 'missing' end
if redis.call('SISMEMBER', done, id) == 1 or redis.call('HEXISTS', failed, id) == 1
   or redis.call('SISMEMBER', skipped, id) == 1 then
  return 'finished'
end
-- an image whose earlier attempt died mid-way counts as started: it is redone even after a cancel
if redis.call('HGET', job, 'cancelled') == '1' and redis.call('SISMEMBER', running, id) == 0 then
  redis.call('SADD', skipped, id)
  redis.call('HINCRBY', KEYS[7], 'images_skipped', 1)
  return 'skipped'
end
if tonumber(redis.call('HGET', KEYS[6], id) or '0') >= tonumber(ARGV[3]) then return 'exhausted' end
redis.call('SADD', running, id)
redis.call('HINCRBY', KEYS[6], id, 1)
redis.call('HSETNX', job, 'started_at', ARGV[2])
return 'run'
