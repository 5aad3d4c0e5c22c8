-- note_lost(KEYS = running, lost; ARGV = reason, id, id, ...): record why the running ones of these
-- images stopped (shown if they run out of attempts).
for i = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 1 then redis.call('HSET', KEYS[2], ARGV[i], ARGV[1]) end
end
