"""Where finished work goes: the reply list a waiting API request blocks on."""

from __future__ import annotations

import json

from redis import Redis

from shared.keys import Keys
from shared.protocol import EmbedPayload, ItemResult


def dump_results(results: list[ItemResult]) -> str:
    return json.dumps([result.model_dump(exclude_none=True) for result in results])


class ResultStore:
    def __init__(self, redis: Redis, keys: Keys, reply_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._reply_ttl_s = reply_ttl_s

    def is_abandoned(self, reply_key: str) -> bool:
        return bool(self._redis.exists(self._keys.abandoned(reply_key)))

    def reply(self, payload: EmbedPayload, results: list[ItemResult]) -> None:
        # An API that gave up never pops the list; the expiry discards the late answer.
        pipe = self._redis.pipeline(transaction=True)
        pipe.rpush(payload.reply_key, dump_results(results))
        pipe.expire(payload.reply_key, self._reply_ttl_s)
        blobs = [ref.data for ref in payload.items if ref.kind == "blob"]
        if blobs:
            pipe.delete(*blobs)
        pipe.execute()
