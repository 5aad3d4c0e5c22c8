-- count_attempt(KEYS[1]=job hash): one more delivery of a one-task job began; its count, or 0 when
-- Redis no longer has the job (nothing is recreated).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
