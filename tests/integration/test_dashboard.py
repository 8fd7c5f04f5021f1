"""The dashboard in a real browser: headless Chromium against a real gateway with traffic.

A real ``twistd -n txgateway`` with three routes: two on echo upstreams that
get real traffic, one on an upstream that is gone (its instance is down and
its breaker opens).  Debian's ``chromium`` loads ``/`` from the admin
listener, runs the page's JavaScript (which polls ``/admin/stats``) and dumps
the rendered DOM; the test finds the route names, the instance states, the
open breaker and a non-zero request rate in it, and saves a screenshot under
the trial temp directory (its path is in the test log).

Chromium runs as a child process of the reactor (``getProcessOutputAndValue``)
so the test's upstreams keep serving while the page loads.  Without
chromium the tests are skipped, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial.unittest import FailTest

from tests.integration.harness import (
    LOCALHOST,
    EchoUpstream,
    GatewayTestCase,
    child_environment,
    parse_responses,
    raw_exchange,
    reactor,
    sleep,
)
from tests.tools import missing

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT = shutil.which("timeout") or "/usr/bin/timeout"
TOKEN = "dashboard-it-token"

log = Logger()


def require_chromium() -> None:
    if os.access(CHROMIUM, os.X_OK):
        return
    raise missing(f"headless Chromium ({CHROMIUM}) is not installed: apt-get install chromium")


class Element:
    def __init__(self, tag: str, attributes: dict[str, str]) -> None:
        self.tag = tag
        self.attributes = attributes
        self.text = ""

    @property
    def classes(self) -> set[str]:
        return set(self.attributes.get("class", "").split())


class DOM(HTMLParser):
    """Every element of a dumped page with its attributes and its text."""

    VOID = frozenset({"meta", "link", "input", "br", "img", "hr"})

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index].tag == tag:
                del self._open[index:]
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def by_id(self, name: str) -> Element:
        return next(e for e in self.elements if e.attributes.get("id") == name)

    def with_attribute(self, name: str) -> list[Element]:
        return [e for e in self.elements if name in e.attributes]


class Browser:
    """Headless Chromium with its own profile under ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    async def run(self, *arguments: str) -> bytes:
        args = (
            "-k", "5", "90", CHROMIUM,
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--hide-scrollbars", "--window-size=1440,1100",
            f"--user-data-dir={os.path.join(self.directory, 'profile')}",
            "--virtual-time-budget=6000",
            *arguments,
        )  # fmt: skip
        env = child_environment(HOME=self.directory)
        out, err, code = await getProcessOutputAndValue(TIMEOUT, args, env=env, path=self.directory, reactor=reactor)
        if code != 0:
            raise FailTest(f"chromium exited with {code}:\n{err.decode(errors='replace')[-3000:]}")
        result: bytes = out
        return result

    async def dom(self, url: str) -> DOM:
        html = await self.run("--dump-dom", url)
        return DOM(html.decode("utf-8"))

    async def screenshot(self, url: str, path: str) -> None:
        await self.run(f"--screenshot={path}", url)


class DashboardTests(GatewayTestCase):
    upstreams = {"users": EchoUpstream, "orders": EchoUpstream}
    unreachable = ("gone",)

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "upstreams": {
                "users": {"servers": [{"address": f"{LOCALHOST}:{ports['users']}"}]},
                "orders": {"servers": [{"address": f"{LOCALHOST}:{ports['orders']}"}]},
                "gone": {
                    "servers": [{"address": f"{LOCALHOST}:{ports['gone']}"}],
                    "health_check": {"enabled": True, "interval": 0.2, "timeout": 0.5, "unhealthy_threshold": 1},
                    "circuit_breaker": {"failure_threshold": 2, "recovery_timeout": 60},
                    # With retries a refused pick (no healthy instance) is a failed request
                    # the breaker counts; without, it escapes the breaker (see the report).
                    "retry": {"attempts": 2},
                    "timeouts": {"connect": 1, "request": 2},
                },
            },
            "routes": [
                {"name": "users-api", "match": {"path": "/users/*", "methods": ["GET"]}, "upstream": "users"},
                {"name": "orders-api", "match": {"path": "/orders/*"}, "upstream": "orders"},
                {"name": "legacy", "match": {"path": "/legacy/*"}, "upstream": "gone"},
            ],
        }

    async def get(self, port: int, path: str) -> Any:
        raw = await raw_exchange(
            port, f"GET {path} HTTP/1.1\r\nHost: {LOCALHOST}\r\nConnection: close\r\n\r\n".encode()
        )
        [response] = parse_responses(raw, until_close=True)
        return response

    async def traffic(self, seconds: float) -> int:
        """Requests on both live routes (and a few on the dead one) for ``seconds``."""
        sent = 0
        deadline = reactor.seconds() + seconds
        while reactor.seconds() < deadline:
            for path in ("/users/1", "/users/2", "/orders/7"):
                response = await self.get(self.port, path)
                self.assertEqual(response.status, 200)
                sent += 1
        for _ in range(3):
            response = await self.get(self.port, "/legacy/x")
            self.assertIn(response.status, (502, 503))
        return sent

    async def stats(self) -> Any:
        response = await self.get(self.gateway.admin_port, "/admin/stats")
        self.assertEqual(response.status, 200)
        return response.json()

    async def wait_for_rates(self, within: float) -> Any:
        """/admin/stats once the sampler has seen the traffic on the live routes."""
        deadline = reactor.seconds() + within
        while True:
            stats = await self.stats()
            rates = {r["name"]: (r["traffic"] or {}).get("request_rate", 0) for r in stats["routes"]}
            if rates.get("users-api", 0) > 0 and rates.get("orders-api", 0) > 0:
                return stats
            if reactor.seconds() > deadline:
                self.fail(f"no request rate in /admin/stats within {within}s: {stats}")
            await sleep(0.2)

    def test_dashboard_shows_routes_instances_breakers_and_live_rates(self) -> Deferred[None]:
        require_chromium()

        async def scenario() -> None:
            await self.stats()  # the dashboard is open: sampling starts
            sent = await self.traffic(3.0)
            self.assertGreater(sent, 30)
            stats = await self.wait_for_rates(within=10.0)
            self.assertEqual(stats["breakers"][0]["state"], "open")

            browser = Browser(os.path.abspath(self.mktemp()))
            url = f"http://{LOCALHOST}:{self.gateway.admin_port}/"
            dom = await browser.dom(url)

            self.assertNotIn("hidden", dom.by_id("overview").classes, "the dashboard did not render its data")
            self.assertIn("hidden", dom.by_id("login").classes)
            rows = {e.attributes["data-route"]: e for e in dom.with_attribute("data-route")}
            self.assertEqual(set(rows), {"users-api", "orders-api", "legacy"})
            self.assertIn("users-api", rows["users-api"].text)
            self.assertGreater(float(rows["users-api"].attributes["data-rate"]), 0.0)
            self.assertGreater(float(rows["orders-api"].attributes["data-rate"]), 0.0)
            self.assertGreater(float(dom.by_id("total-rate").text), 0.0)

            instances = {
                e.attributes["data-address"]: e.attributes["data-status"] for e in dom.with_attribute("data-status")
            }
            self.assertEqual(instances[f"{LOCALHOST}:{self.ports['users']}"], "healthy")
            self.assertEqual(instances[f"{LOCALHOST}:{self.ports['orders']}"], "healthy")
            self.assertEqual(instances[f"{LOCALHOST}:{self.ports['gone']}"], "down")
            self.assertEqual([e.attributes["data-breaker"] for e in dom.with_attribute("data-breaker")], ["open"])
            self.assertEqual(dom.by_id("generation").text.strip(), str(stats["generation"]))
            self.assertEqual(dom.by_id("reload-status").text.strip(), "ok")

            screenshot = os.path.join(browser.directory, "dashboard.png")
            await browser.screenshot(url, screenshot)
            with open(screenshot, "rb") as file:
                self.assertEqual(file.read(8), b"\x89PNG\r\n\x1a\n")
            log.info("dashboard screenshot saved to {path}", path=screenshot)

        return Deferred.fromCoroutine(scenario())


class DashboardTokenTests(GatewayTestCase):
    upstreams = {"users": EchoUpstream}

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "admin": {"token": TOKEN},
            "upstreams": {"users": {"servers": [{"address": f"{LOCALHOST}:{ports['users']}"}]}},
            "routes": [{"name": "users-api", "match": {"path": "/users/*"}, "upstream": "users"}],
        }

    def test_the_page_asks_for_the_token_and_shows_nothing_else(self) -> Deferred[None]:
        require_chromium()

        async def scenario() -> None:
            browser = Browser(os.path.abspath(self.mktemp()))
            dom = await browser.dom(f"http://{LOCALHOST}:{self.gateway.admin_port}/")
            self.assertNotIn("hidden", dom.by_id("login").classes)
            self.assertIn("hidden", dom.by_id("overview").classes)
            self.assertIn("bearer token", dom.by_id("login-message").text)
            self.assertEqual(dom.with_attribute("data-route"), [])
            self.assertEqual(dom.by_id("token").attributes["type"], "password")

        return Deferred.fromCoroutine(scenario())
