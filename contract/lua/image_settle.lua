-- settle(KEYS = job, units, order, running, done, failed, skipped, stats; ARGV = stage, chunk size,
-- chunks, now, cancel ('1': a cancel)): count every chunk of the stage whose images are all
-- accounted for (done, failed or skipped: count_chunk), so that the job ends once its last image
-- does, whichever delivery accounted for it (a chunk whose worker died after its last image is
-- counted here). A cancel first flags the job and moves every image that has not started to
-- skipped, in the same step: then only chunks with an image running wait (they count themselves
-- when it finishes). Returns {skipped, 1 when that completed the stage else 0}; {-1, 0} when Redis
-- no longer has the job, {0, 0} when the stage already ended.
local job, units, order, running, done, failed, skipped = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
if redis.call('EXISTS', job) == 0 then return {-1, 0} end
if redis.call('HGET', job, ARGV[1] .. '.state') == 'done' then return {0, 0} end
local cancel = ARGV[5] == '1'
if cancel then redis.call('HSET', job, 'cancelled', '1') end
local n, completed, size = 0, 0, tonumber(ARGV[2])
for chunk = 0, tonumber(ARGV[3]) - 1 do
  local busy = false
  for _, id in ipairs(redis.call('LRANGE', order, chunk * size, chunk * size + size - 1)) do
    if redis.call('SISMEMBER', done, id) == 0 and redis.call('HEXISTS', failed, id) == 0
       and redis.call('SISMEMBER', skipped, id) == 0 then
      if cancel and redis.call('SISMEMBER', running, id) == 0 then
        redis.call('SADD', skipped, id)
        n = n + 1
      else
        busy = true
      end
    end
  end
  if not busy and count_chunk(job, units, ARGV[1], chunk, ARGV[3], ARGV[4]) == 2 then completed = 1 end
end
redis.call('HINCRBY', KEYS[8], 'images_skipped', n)
return {n, completed}
