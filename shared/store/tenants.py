"""Per-key quota of unfinished images, kept in Redis (``Keys.tenant_work`` / ``tenant_images``).

Work is admitted against the key's limit in one script (``ADMIT``), so concurrent requests of one
key on any number of API instances cannot overshoot it. An entry shrinks as a job's items finish
(``settle``, inside the job scripts), and leaves when its request is answered or withdrawn, its
job completes or is cancelled, or, should nobody say so (an API process died), when its expiry
passes: every admission purges lapsed entries first, so the ledger heals itself.
"""

from __future__ import annotations

# Lua helpers the job scripts (shared.store.jobs) and the quota scripts share. `work` is the key's sorted
# set of work id -> expiry, `images` its hash of work id -> unfinished images plus 'total'.
QUOTA_FUNCTIONS = """
local function quota_keep(key, ttl)
  if redis.call('TTL', key) < ttl then
    redis.call('EXPIRE', key, ttl)
  end
end
local function quota_release(work, images, id)
  local n = redis.call('HGET', images, id)
  if n then
    redis.call('HINCRBY', images, 'total', -tonumber(n))
    redis.call('HDEL', images, id)
  end
  redis.call('ZREM', work, id)
  if redis.call('ZCARD', work) == 0 then
    -- Nothing left to count: a key's ledger does not outlive its work (the zset is gone already).
    redis.call('DEL', images)
  end
end
local function quota_settle(work, images, id, done, ttl, now)
  local n = redis.call('HGET', images, id)
  if n and done > 0 then
    local settled = math.min(tonumber(n), done)
    redis.call('HINCRBY', images, id, -settled)
    redis.call('HINCRBY', images, 'total', -settled)
  end
  if n then
    redis.call('ZADD', work, 'XX', now + ttl, id)
    quota_keep(work, ttl + 60)
    quota_keep(images, ttl + 60)
  end
end
"""

# KEYS: work, images. ARGV: now, work id, expiry, images, limit.
# Returns {1, total} when admitted (total includes this work), {0, total} when refused.
ADMIT = QUOTA_FUNCTIONS + """
local now = tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  quota_release(KEYS[1], KEYS[2], id)
end
local total = tonumber(redis.call('HGET', KEYS[2], 'total') or '0')
local images = tonumber(ARGV[4])
if total + images > tonumber(ARGV[5]) then
  return {0, total}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], images)
redis.call('HINCRBY', KEYS[2], 'total', images)
local ttl = math.ceil(tonumber(ARGV[3]) - now) + 60
quota_keep(KEYS[1], ttl)
quota_keep(KEYS[2], ttl)
return {1, total + images}
"""

# KEYS: work, images. ARGV: work id. Idempotent.
RELEASE = QUOTA_FUNCTIONS + """
quota_release(KEYS[1], KEYS[2], ARGV[1])
"""
