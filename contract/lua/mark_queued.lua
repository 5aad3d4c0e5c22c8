-- mark_queued(KEYS[1]=attempts hash, ARGV = unit, now, stale after s): whether the caller should
-- send the unit's message now. Yes when it was never sent, when it started after it was last sent
-- (that delivery died: its lease is gone, the caller checked), or when it was sent longer ago than
-- a broker keeps a message unacknowledged (the message was lost with Redis). Each yes is recorded,
-- so that two callers never both send it.
local unit, now = ARGV[1], tonumber(ARGV[2])
local queued = tonumber(redis.call('HGET', KEYS[1], unit .. '.queued') or '-1')
local started = tonumber(redis.call('HGET', KEYS[1], unit .. '.started') or '-1')
if redis.call('HGET', KEYS[1], unit .. '.done') then return 0 end
if queued >= 0 and started <= queued and now - queued < tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], unit .. '.queued', ARGV[2])
return 1
