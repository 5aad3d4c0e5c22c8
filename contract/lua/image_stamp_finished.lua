-- stamp_finished(KEYS[1] = job hash, ARGV[1] = now): the end time, only on a job Redis still has.
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[1]) end
