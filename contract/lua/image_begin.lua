-- begin(KEYS as give_up, then done, skipped, active; ARGV = id, now, max attempts, reason, job id):
-- skip if the job is cancelled, do nothing if the image already finished, fail it if its earlier
-- attempts used up the bound, else mark it running (with a heartbeat).
local job, running, failed, beat, attempts = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[7]
local done, skipped = KEYS[8], KEYS[9]
local id = ARGV[1]
if redis.call('EXISTS', job) == 0 then
  return 'missing'
end
if redis.call('SISMEMBER', done, id) == 1 or redis.call('HEXISTS', failed, id) == 1
   or redis.call('SISMEMBER', skipped, id) == 1 then
  return 'finished'
end
local started = redis.call('SISMEMBER', running, id) == 1
-- an image whose earlier attempt died mid-way counts as started: it is redone even after a cancel
if redis.call('HGET', job, 'cancelled') == '1' and not started then
  redis.call('SADD', skipped, id)
  redis.call('HINCRBY', KEYS[6], 'images_skipped', 1)
  return 'skipped'
end
if started and tonumber(redis.call('HGET', attempts, id) or '0') >= tonumber(ARGV[3]) then
  give_up(id, ARGV[4])
  return 'failed'
end
redis.call('SADD', running, id)
redis.call('HINCRBY', attempts, id, 1)
redis.call('HSET', beat, id, ARGV[2])
redis.call('HSETNX', job, 'started_at', ARGV[2])
redis.call('SADD', KEYS[10], ARGV[5])
return 'run'
