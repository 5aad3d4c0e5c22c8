-- heartbeat(KEYS = running, beat; ARGV = now, id, id, ...): refresh the heartbeat of the listed
-- images that are still running.
for _, id in ipairs(ARGV) do
  if id ~= ARGV[1] and redis.call('SISMEMBER', KEYS[1], id) == 1 then redis.call('HSET', KEYS[2], id, ARGV[1]) end
end
