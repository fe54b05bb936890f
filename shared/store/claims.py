"""Which worker holds a synchronous request: written by the worker that starts it, read by the API.

The API waits on a request for at most its deadline, while the broker hands an unacknowledged task
to another worker only after its visibility timeout, which is longer. So the worker that starts a
request claims it under its own name, and the waiting API, seeing that worker drop out of the
model's heartbeat registry, sends the request again within the deadline.
"""

from __future__ import annotations

import math
import time

from redis import Redis

from shared.keys import Keys

# KEYS: claim, the model's worker registry. ARGV: now. 0: nobody has started the request yet;
# 1: the worker that started it is alive; 2: that worker stopped heartbeating (claim cleared, so
# the request is sent again once per lost holder); 3: no live worker serves the model at all.
HOLDER_STATE = """
if redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf') == 0 then
  return 3
end
local holder = redis.call('GET', KEYS[1])
if not holder then
  return 0
end
local expiry = redis.call('ZSCORE', KEYS[2], holder)
if expiry and tonumber(expiry) > tonumber(ARGV[1]) then
  return 1
end
redis.call('DEL', KEYS[1])
return 2
"""
HOLDER_LOST = 2
NO_WORKER = 3


def claim(redis: Redis, keys: Keys, reply_key: str, worker_name: str, deadline: float) -> None:
    """Mark the request as started by ``worker_name`` until a little past its deadline."""
    redis.set(keys.claim(reply_key), worker_name, ex=max(1, math.ceil(deadline - time.time()) + 5))
