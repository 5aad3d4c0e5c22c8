-- mark_queued(KEYS[1]=units hash, KEYS[1 + i]=the lease of the i-th unit; ARGV = now, stale after s,
-- limit (0: none), unit, unit, ...): which of the units (their positions, from 0) the caller should
-- send now, at most limit. One is due when no live delivery holds its lease and it is not done, and
-- it was never sent, or it started after it was last sent (that delivery died: its lease is gone),
-- or it was sent longer ago than a broker keeps a message unacknowledged (the message was lost with
-- Redis). Each is recorded as sent, so that two callers never both send it.
local now, stale, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due = {}
for i = 4, #ARGV do
  if limit > 0 and #due >= limit then break end
  local unit = ARGV[i]
  if redis.call('EXISTS', KEYS[i - 2]) == 0 and not redis.call('HGET', KEYS[1], unit .. '.done') then
    local queued = tonumber(redis.call('HGET', KEYS[1], unit .. '.queued') or '-1')
    local started = tonumber(redis.call('HGET', KEYS[1], unit .. '.started') or '-1')
    if queued < 0 or started > queued or now - queued >= stale then
      redis.call('HSET', KEYS[1], unit .. '.queued', ARGV[1])
      due[#due + 1] = i - 4
    end
  end
end
return due
