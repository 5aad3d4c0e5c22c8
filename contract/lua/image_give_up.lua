-- give_up(KEYS = job, running, done, failed, skipped, attempts, stats; ARGV = reason, attempts, id,
-- id, ...): the images of a chunk whose deliveries all died, those not finished, fail with the
-- reason; each is charged the chunk's attempts (none of them finished it). Returns how many failed.
local job, running, done, failed, skipped, attempts = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', job) == 0 then return 0 end
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('SISMEMBER', done, id) == 0 and redis.call('HEXISTS', failed, id) == 0
     and redis.call('SISMEMBER', skipped, id) == 0 then
    redis.call('SREM', running, id)
    redis.call('HSET', failed, id, ARGV[1])
    redis.call('HSET', attempts, id, ARGV[2])
    n = n + 1
  end
end
redis.call('HINCRBY', KEYS[7], 'images_failed', n)
return n
