"""Active health checks end to end: a real ``twistd -n txgateway``, two real upstreams.

One upstream goes away: within a second or two the checks take it out and all
traffic goes to the other, with no 502 after that.  It comes back: traffic
returns to it.  The admin API (behind its token) shows the same thing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from tests.integration.harness import (
    LOCALHOST,
    EchoUpstream,
    GatewayTestCase,
    parse_responses,
    raw_exchange,
    reactor,
    sleep,
)

TOKEN = "it-admin-token"


class ActiveHealthCheckTests(GatewayTestCase):
    upstreams = {"a": EchoUpstream, "b": EchoUpstream}

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "admin": {"token": TOKEN},
            "upstreams": {
                "svc": {
                    "servers": [{"address": f"{LOCALHOST}:{ports['a']}"}, {"address": f"{LOCALHOST}:{ports['b']}"}],
                    "health_check": {
                        "enabled": True,
                        "path": "/health",
                        "interval": 0.2,
                        "timeout": 0.5,
                        "healthy_threshold": 2,
                        "unhealthy_threshold": 2,
                    },
                    "timeouts": {"connect": 1, "request": 5},
                },
            },
            "routes": [{"name": "svc", "match": {"path": "/svc/*"}, "upstream": "svc"}],
        }

    async def get(self, port: int, path: str, headers: str = "") -> Any:
        raw = await raw_exchange(
            port, f"GET {path} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n".encode(), 5.0
        )
        [response] = parse_responses(raw, until_close=True)
        return response

    async def available(self) -> int:
        response = await self.get(self.gateway.admin_port, "/admin/upstreams", f"Authorization: Bearer {TOKEN}\r\n")
        self.assertEqual(response.status, 200)
        [svc] = response.json()["upstreams"]
        count: int = svc["available"]
        return count

    async def wait_available(self, count: int, within: float) -> float:
        """Seconds until the gateway shows ``count`` available instances (fails after ``within``)."""
        start = reactor.seconds()
        while await self.available() != count:
            if reactor.seconds() - start > within:
                self.fail(f"not {count} available instances within {within}s")
            await sleep(0.02)
        elapsed: float = reactor.seconds() - start
        return elapsed

    async def wait_checked(self, name: str) -> None:
        start = reactor.seconds()
        while not any(r.path == "/health" and r.header_values("host") for r in self.servers[name].requests):
            if reactor.seconds() - start > 2.0:
                self.fail(f"upstream {name} was not health-checked")
            await sleep(0.02)
        check = next(r for r in self.servers[name].requests if r.path == "/health")
        self.assertEqual(check.method, "GET")
        self.assertEqual(check.header_values("host"), [f"{LOCALHOST}:{self.ports[name]}"])

    async def traffic(self, count: int) -> dict[str, int]:
        """Send ``count`` requests; how many each upstream served (or the failing status)."""
        seen = {"a": 0, "b": 0}
        for i in range(count):
            before = {name: self.served(name) for name in seen}
            response = await self.get(self.port, f"/svc/{i}")
            if response.status != 200:
                seen[str(response.status)] = seen.get(str(response.status), 0) + 1
                continue
            for name in ("a", "b"):
                if self.served(name) > before[name]:
                    seen[name] += 1
        return seen

    def served(self, name: str) -> int:
        server = self.servers[name]
        return sum(1 for r in server.requests if r.path.startswith("/svc/"))

    def test_traffic_follows_health(self) -> Any:
        async def scenario() -> None:
            # The gateway may have checked before the upstreams listened: start from both healthy.
            await self.wait_available(2, within=3.0)
            self.assertEqual(await self.traffic(10), {"a": 5, "b": 5})
            await self.wait_checked("a")

            await self.servers["a"].stop()
            elapsed = await self.wait_available(1, within=2.0)
            self.assertLess(elapsed, 2.0)
            self.assertEqual(await self.traffic(20), {"a": 0, "b": 20})  # no 502 once ejected

            restarted = EchoUpstream()
            restarted.listen(self.ports["a"])
            self.addCleanup(restarted.stop)
            self.servers["a"] = restarted
            await self.wait_available(2, within=2.0)
            self.assertEqual(await self.traffic(10), {"a": 5, "b": 5})

            response = await self.get(self.gateway.admin_port, "/admin/upstreams")
            self.assertEqual(response.status, 401)

        return Deferred.fromCoroutine(scenario())
