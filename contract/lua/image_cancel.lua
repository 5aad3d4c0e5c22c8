-- cancel(KEYS = job, units, order, running, done, failed, skipped, stats; ARGV = stage, chunk size,
-- chunks, now): flag the job and move every image that has not started to skipped, in one step; every
-- chunk with no image running is then accounted for and counted (count_chunk; the chunks still
-- running count themselves when their images finish). Returns {skipped, 1 when that completed the
-- stage else 0}; {-1, 0} when Redis no longer has the job, {0, 0} when the stage already ended.
local job, units, order, running, done, failed, skipped = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
if redis.call('EXISTS', job) == 0 then return {-1, 0} end
if redis.call('HGET', job, ARGV[1] .. '.state') == 'done' then return {0, 0} end
redis.call('HSET', job, 'cancelled', '1')
local n, completed, size = 0, 0, tonumber(ARGV[2])
for chunk = 0, tonumber(ARGV[3]) - 1 do
  local busy = false
  for _, id in ipairs(redis.call('LRANGE', order, chunk * size, chunk * size + size - 1)) do
    if redis.call('SISMEMBER', running, id) == 1 then
      busy = true
    elseif redis.call('SISMEMBER', done, id) == 0 and redis.call('HEXISTS', failed, id) == 0
           and redis.call('SADD', skipped, id) == 1 then
      n = n + 1
    end
  end
  if not busy and count_chunk(job, units, ARGV[1], chunk, ARGV[3], ARGV[4]) == 2 then completed = 1 end
end
redis.call('HINCRBY', KEYS[8], 'images_skipped', n)
return {n, completed}
