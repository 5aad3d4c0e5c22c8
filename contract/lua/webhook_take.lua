-- take(KEYS[1] = outbox; ARGV = now, leased until): the first delivery due at ARGV[1], leased until
-- ARGV[2]; nil when none is due.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[2], due[1])
return due[1]
