import redis.asyncio as aioredis

from proxy.config.schema import Config, RedisConfig
from proxy.gateway import Gateway


async def test_gateway_shares_one_redis_client(redis_url):
    gateway = Gateway(Config(redis=RedisConfig(url=redis_url)))
    await gateway.start()
    try:
        assert gateway.redis is gateway.redis
        await gateway.redis.set("k", "v")
        assert await aioredis.Redis.from_url(redis_url).get("k") == b"v"
    finally:
        await gateway.close()


async def test_gateway_redis_client_survives_a_redis_restart(redis_server):
    gateway = Gateway(Config(redis=RedisConfig(url=redis_server.url)))
    await gateway.start()
    try:
        assert await gateway.redis.ping()
        redis_server.stop()
        redis_server.start()
        assert await gateway.redis.ping()  # the stale pooled connection is replaced, once
    finally:
        await gateway.close()
