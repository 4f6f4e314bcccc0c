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


async def test_stop_task_ends_a_loop_that_swallows_one_cancellation():
    import asyncio

    from proxy.tasks import stop_task

    swallowed = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not swallowed:  # as wait_for can on Python 3.11: the first cancellation is lost
                    swallowed.append(True)
                    continue
                raise

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task), 3)
    assert task.cancelled() and swallowed == [True]
