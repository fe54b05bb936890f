"""The API's asyncio Redis client: commands packed by hiredis, byte for byte as redis-py packs them, and
its lean pool handing out clean connections, also after commands cancelled mid-wait."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from redis.asyncio.connection import Connection

from devtools.redis_server import RedisServer
from shared.redis_client import async_client


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "0" * 40, 3, "k1", "k2", "k3", 1764261234.123456, 1e20, 0.1, -2, 2**70, "é", b"\x00\xff\r\n"),
        ("CONFIG GET", "maxmemory"),  # a command name of two words is sent as two arguments
        (b"SCRIPT LOAD", "return 1"),
        ("HSET", "blobs", 0, b"\xff" * 100_000, 1, b""),  # a large value goes as a chunk of its own
        ("SET", "k", memoryview(b"view")),
    ],
)
def test_packing_matches_redis_py(args: tuple[object, ...]) -> None:
    client = async_client("redis://127.0.0.1:1/0")
    packing = client.connection_pool.connection_class()
    assert isinstance(packing, Connection) and type(packing) is not Connection
    assert b"".join(packing.pack_command(*args)) == b"".join(Connection().pack_command(*args))
    large = any(isinstance(arg, bytes) and len(arg) > 6000 for arg in args)
    assert len(packing.pack_command(*args)) > 1 if large else len(packing.pack_command(*args)) == 1


def test_commands_and_pool_on_a_real_redis(redis_server: RedisServer) -> None:
    async def exercise() -> None:
        client = async_client(redis_server.url)
        pool = client.connection_pool
        try:
            values = {f"api-client:{n}": (b"%d" % n) * (n * 997 % 20_000) for n in range(64)}
            await asyncio.gather(*(client.set(key, value) for key, value in values.items()))
            assert await asyncio.gather(*(client.get(key) for key in values)) == list(values.values())
            pipe = client.pipeline(transaction=True)
            pipe.hset("api-client:h", mapping={"f": 1.5, "g": "é"})
            pipe.hgetall("api-client:h")
            assert (await pipe.execute())[1] == {b"f": b"1.5", b"g": "é".encode()}
            assert not pool._in_use_connections and len(pool._available_connections) <= 64

            # A wait cancelled before its answer (which the push then sends): its connection is not
            # handed out again with that answer unread, so each later command gets its own reply.
            waiter = asyncio.ensure_future(client.blpop(["api-client:list"], timeout=5))
            await asyncio.sleep(0.2)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await client.rpush("api-client:list", b"late")
            for _ in range(3 * len(pool._available_connections) + 3):
                assert await client.echo(b"mine") == b"mine"
            assert not pool._in_use_connections
        finally:
            await client.aclose()
        assert not pool._available_connections or all(not connection.is_connected for connection in pool._available_connections)

    asyncio.run(exercise())


def test_sentinel_clients_pack_with_hiredis_too() -> None:
    client = async_client("sentinel://127.0.0.1:1/0", sentinel_master="primary")
    assert isinstance(client, redis.asyncio.Redis)
    connection = client.connection_pool.connection_class(connection_pool=client.connection_pool)
    assert b"".join(connection.pack_command("SET", "k", 1.5)) == b"".join(Connection().pack_command("SET", "k", 1.5))
