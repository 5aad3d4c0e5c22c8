-- count_chunk(job, units, stage, chunk, chunks, now): count chunk <chunk> of a chunked stage (maps,
-- images) once, however often it runs: 0 when it was counted before, 1 when counted now, 2 when
-- counted now and it completes the stage (the stage is then done: the single completion decision,
-- made for exactly one caller). Loaded ahead of chunk_done.lua and image_cancel.lua, which call it.
local function count_chunk(job, units, stage, chunk, chunks, now)
  if redis.call('HSETNX', units, stage .. '-' .. chunk .. '.done', now) == 0 then return 0 end
  redis.call('EXPIRE', units, redis.call('TTL', job))
  if redis.call('HINCRBY', job, 'chunks_done', 1) < tonumber(chunks) then return 1 end
  local state = redis.call('HGET', job, stage .. '.state') or 'pending'
  if state ~= 'pending' and state ~= 'running' then return 1 end
  redis.call('HSET', job, stage .. '.state', 'done', stage .. '.finished', now)
  return 2
end
