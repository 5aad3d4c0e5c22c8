-- chunk_done(KEYS[1]=job hash, KEYS[2]=units hash, KEYS[3]=failures hash, ARGV = stage, chunk,
-- chunks, now, ttl, id, error, id, error, ...): count a finished chunk once (count_chunk), keeping
-- its images without a result the first time. Returns 1 to exactly one caller, the one whose chunk
-- completes the stage, else 0; -1 when Redis lost the job.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local counted = count_chunk(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if counted == 0 then return 0 end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[3], ARGV[5])
return counted - 1
