-- chunk_done(KEYS[1]=job hash, KEYS[2]=attempts hash, KEYS[3]=failures hash, ARGV = chunk, chunks,
-- now, ttl, id, error, id, error, ...): count a chunk of maps once, however often it runs. Returns 1
-- to exactly one caller, the one whose chunk completes the stage (the maps stage is then done:
-- the single completion decision), else 0; -1 when Redis lost the job.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local unit = 'maps-' .. ARGV[1]
if redis.call('HSETNX', KEYS[2], unit .. '.done', ARGV[3]) == 0 then return 0 end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[3], ARGV[4])
local done = redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
if done < tonumber(ARGV[2]) then return 0 end
local state = redis.call('HGET', KEYS[1], 'maps.state') or 'pending'
if state ~= 'pending' and state ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'maps.state', 'done', 'maps.finished', ARGV[3])
return 1
