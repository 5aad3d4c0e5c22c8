-- give_up(id, reason): fail an image that has used up its attempts (KEYS: job, running, failed, beat,
-- lost, stats, attempts); the reason is the one recorded for its last lost attempt, if any. Loaded
-- ahead of image_begin.lua and image_reap.lua, which call it.
local function give_up(id, default)
  local reason = redis.call('HGET', KEYS[5], id) or default
  local n = redis.call('HGET', KEYS[7], id) or '0'
  redis.call('SREM', KEYS[2], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HSET', KEYS[3], id, reason .. ' after ' .. n .. ' attempts')
  redis.call('HINCRBY', KEYS[6], 'images_failed', 1)
end
