"""``middleware.cache`` in the configuration: the ``redis`` block (url and
timeout, as for the rate limiter) and what goes wrong in it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import ConfigError, parse_config
from txgateway.config.model import CacheConfig

UPSTREAMS = """
upstreams:
  app: {servers: ["10.1.1.1:9001"]}
"""


class CacheConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        cache = parse_config(UPSTREAMS).middleware.cache
        self.assertEqual(cache, CacheConfig())
        self.assertEqual((cache.enabled, cache.storage), (False, "memory"))
        self.assertEqual((cache.redis_url, cache.redis_timeout), ("redis://127.0.0.1:6379/0", 0.05))

    def test_redis_block(self) -> None:
        cache = parse_config(
            UPSTREAMS
            + """
middleware:
  cache:
    enabled: true
    storage: redis
    redis: {url: "rediss://:pw@cache.internal:6380/2", timeout: 0.2}
"""
        ).middleware.cache
        self.assertEqual(
            (cache.storage, cache.redis_url, cache.redis_timeout), ("redis", "rediss://:pw@cache.internal:6380/2", 0.2)
        )

    def test_problems_name_their_path(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            parse_config(
                UPSTREAMS
                + """
middleware:
  cache:
    storage: disk
    redis: {url: "http://cache", timeout: 0, db: 1}
"""
            )
        text = str(raised.exception)
        for path in (
            "middleware.cache.storage",
            "middleware.cache.redis.url",
            "middleware.cache.redis.timeout",
            "middleware.cache.redis.db",
        ):
            self.assertIn(path, text)
