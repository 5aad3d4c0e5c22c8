-- start(KEYS[1]=job hash, KEYS[2]=attempts hash, ARGV = unit, stage, now, max attempts, reason):
-- one delivery of a unit (a stage, or a chunk "<stage>-<n>") begins. 'missing' (Redis lost the job),
-- 'finished' (the unit or its stage already ended), 'dead' (its earlier deliveries all died: the
-- unit is failed here, the message dead-lettered) or 'run' (its attempt counted, now running).
local unit, stage = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local state = redis.call('HGET', KEYS[1], stage .. '.state') or 'pending'
if state ~= 'pending' and state ~= 'running' then return 'finished' end
if redis.call('HGET', KEYS[2], unit .. '.done') then return 'finished' end
local n = redis.call('HINCRBY', KEYS[2], unit .. '.attempts', 1)
redis.call('EXPIRE', KEYS[2], redis.call('TTL', KEYS[1]))
if n > tonumber(ARGV[4]) then
  return 'dead'
end
redis.call('HSET', KEYS[2], unit .. '.started', ARGV[3])
redis.call('HSETNX', KEYS[1], stage .. '.started', ARGV[3])
redis.call('HSET', KEYS[1], stage .. '.state', 'running')
return 'run'
