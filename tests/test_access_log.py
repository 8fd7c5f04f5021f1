"""The access log: one line per exchange, every field, no secrets, buffered writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txgateway.config import parse_config
from txgateway.observability.access_log import (
    FLUSH_BYTES,
    AccessLog,
    AccessLogFile,
    access_log_for,
    is_secret_name,
    output_key,
    redact_query,
)
from txgateway.pipeline.context import RequestContext
from txgateway.runtime import Runtime
from txgateway.testing import GatewayHarness, MemoryUpstream, ReceivedRequest

NOW = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
API_KEY = "k3y-very-secret-value"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


CONFIG = f"""
server:
  trusted_proxies: ["10.0.0.0/8"]
upstreams:
  users: {{servers: ["10.9.9.9:8080"]}}
routes:
  - {{name: users-api, match: {{path: "/api/users/{{id}}"}}, upstream: users, auth: none, cache: {{enabled: true}}}}
  - name: keyed
    match: {{path: "/keyed/*"}}
    upstream: users
    auth: required
    rate_limit: {{requests_per_minute: 60, burst_size: 5}}
middleware:
  auth:
    jwt: {{algorithms: [HS256], secret: "access-log-test-secret-0123456789", query_param: access_token}}
    api_keys:
      header: X-API-Key
      keys:
        - {{sha256: "{sha(API_KEY)}", consumer: ci-bot}}
"""

FIELDS = [
    "time",
    "request_id",
    "trace_id",
    "client_ip",
    "method",
    "route",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_ms",
    "upstream",
    "consumer",
    "rate_limit",
    "cache",
    "protocol",
    "user_agent",
]


def answer(request: ReceivedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, [(b"content-type", b"application/json")], b'{"ok": true}'


class JSONLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.harness = GatewayHarness(parse_config(CONFIG), MemoryUpstream(answer), clock=self.clock)

    def test_every_field(self) -> None:
        response = self.harness.request(
            "POST",
            "/keyed/orders?page=2&api_key=abc&x=1",
            headers=[
                ("x-api-key", API_KEY),
                ("user-agent", "curl/8.5.0"),
                ("x-forwarded-for", "203.0.113.7"),
                ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),
                ("cookie", "session=cookie-secret"),
            ],
            body=b"0123456789",
        )
        self.assertEqual(response.status, 200)
        [line] = self.harness.access_log.lines
        record = json.loads(line)
        self.assertEqual(list(record), FIELDS)
        self.assertEqual(
            record,
            {
                "time": "2023-11-14T22:13:20.250Z",
                "request_id": response.header("x-request-id"),
                "trace_id": TRACE_ID,
                "client_ip": "127.0.0.1",
                "method": "POST",
                "route": "keyed",
                "path": "/keyed/orders?page=2&api_key=REDACTED&x=1",
                "status": 200,
                "bytes_in": 10,
                "bytes_out": 12,
                "duration_ms": 0.0,
                "upstream_ms": 0.0,
                "upstream": "10.9.9.9:8080",
                "consumer": "ci-bot",
                "rate_limit": "allowed",
                "cache": None,
                "protocol": "http/1.1",
                "user_agent": "curl/8.5.0",
            },
        )
        for secret in (API_KEY, "cookie-secret", "abc"):
            self.assertNotIn(secret, line)

    def test_client_address_behind_a_trusted_proxy(self) -> None:
        harness = GatewayHarness(parse_config(CONFIG), MemoryUpstream(answer), clock=self.clock, client_ip="10.1.2.3")
        harness.request("GET", "/api/users/7", headers=[("x-forwarded-for", "203.0.113.7")])
        [record] = harness.access_log.records()
        self.assertEqual(record["client_ip"], "203.0.113.7")

    def test_unmatched_and_refused_requests(self) -> None:
        self.harness.request("GET", "/nowhere?token=t0p")
        self.harness.request("GET", f"/keyed/x?access_token={TOKEN}", headers=[("authorization", "Bearer nope")])
        self.harness.request("GET", "/api/users/7")
        self.harness.request("GET", "/api/users/7")
        not_found, unauthorized, miss, hit = self.harness.access_log.records()
        self.assertEqual(
            (not_found["route"], not_found["status"], not_found["path"], not_found["upstream"]),
            (None, 404, "/nowhere?token=REDACTED", None),
        )
        self.assertEqual((unauthorized["route"], unauthorized["status"]), ("keyed", 401))
        self.assertIsNone(unauthorized["consumer"])
        self.assertNotIn(TOKEN, json.dumps(unauthorized))
        self.assertEqual((miss["cache"], hit["cache"]), ("miss", "hit"))
        self.assertEqual((hit["upstream"], hit["upstream_ms"]), (None, None))
        self.assertIsNone(miss["rate_limit"])

    def test_duration_and_upstream_time(self) -> None:
        from twisted.internet.defer import Deferred

        def slow(request: ReceivedRequest) -> Deferred[tuple[int, list[tuple[bytes, bytes]], bytes]]:
            d: Deferred[tuple[int, list[tuple[bytes, bytes]], bytes]] = Deferred()
            self.clock.callLater(0.125, d.callback, (200, [], b"late"))
            return d

        harness = GatewayHarness(parse_config(CONFIG), MemoryUpstream(slow), clock=self.clock)
        harness.request("GET", "/api/users/1")
        [record] = harness.access_log.records()
        self.assertEqual((record["duration_ms"], record["upstream_ms"]), (125.0, 125.0))

    def test_no_access_log_when_disabled(self) -> None:
        config = parse_config(CONFIG + "observability: {access_log: {enabled: false}}\n")
        harness = GatewayHarness(config, MemoryUpstream(answer), clock=self.clock)
        self.assertFalse(any(isinstance(o, AccessLog) for o in harness.gateway.observers))
        harness.request("GET", "/api/users/1")
        self.assertEqual(harness.access_log.lines, [])


class CombinedFormatTests(SynchronousTestCase):
    def test_combined_line(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        config = parse_config(CONFIG + "observability: {access_log: {format: combined}}\n")
        harness = GatewayHarness(config, MemoryUpstream(answer), clock=clock, client_ip="192.0.2.1")
        harness.request(
            "GET",
            f"/keyed/a?access_token={TOKEN}&q=%22x%22",
            headers=[("referer", 'https://app.test/"quoted"'), ("user-agent", "Mozilla/5.0 (X11)")],
        )
        harness.request("GET", "/keyed/b", headers=[("x-api-key", API_KEY)])
        first, second = harness.access_log.lines
        self.assertEqual(
            first,
            # The auth stage took the query token out before the log saw the request.
            '192.0.2.1 - - [14/Nov/2023:22:13:20 +0000] "GET /keyed/a?q=%22x%22 HTTP/1.1" '
            '401 80 "https://app.test/\\x22quoted\\x22" "Mozilla/5.0 (X11)"',
        )
        self.assertEqual(
            second, '192.0.2.1 - ci-bot [14/Nov/2023:22:13:20 +0000] "GET /keyed/b HTTP/1.1" 200 12 "-" "-"'
        )

    def test_client_controlled_text_cannot_forge_fields(self) -> None:
        ctx = RequestContext(b"GET", '/a"b', b"", [(b"user-agent", b'x" 200 "\n\x01\xff')], client_ip="1.2.3.4")
        ctx.status = 200
        line = AccessLog(_Lines(), "combined").combined_line(ctx)
        self.assertEqual(line.count('"'), 6)
        self.assertIn("\\x0A\\x01\\xFF", line)
        self.assertNotIn("\n", line)


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)


class RedactionTests(SynchronousTestCase):
    def test_secret_looking_parameters(self) -> None:
        for name in (
            "token",
            "access_token",
            "id_token",
            "refreshToken",
            "api_key",
            "apikey",
            "x-api-key",
            "key",
            "password",
            "client_secret",
            "X-Amz-Signature",
            "sig",
            "auth",
            "session_id",
            "jwt",
        ):
            self.assertTrue(is_secret_name(name.lower()), name)
        for name in ("page", "q", "monkey", "keyword", "sort", "id", "author"):
            self.assertFalse(is_secret_name(name), name)

    def test_values_replaced_rest_kept_byte_for_byte(self) -> None:
        self.assertEqual(
            redact_query(b"a=1&token=abc&b=%20x&Api%5FKey=zz&flag&empty=&tok=keep"),
            "a=1&token=REDACTED&b=%20x&Api%5FKey=REDACTED&flag&empty=&tok=keep",
        )
        self.assertEqual(redact_query(b"sso=1&code=42", frozenset({"sso"})), "sso=REDACTED&code=42")
        self.assertEqual(redact_query(b"password+=x"), "password+=REDACTED")


class AccessLogFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="txgateway-access-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = Path(directory) / "access.log"
        self.clock = Clock()
        self.file = AccessLogFile(str(self.path), self.clock)
        self.addCleanup(self.file.stop)

    def test_lines_wait_for_the_timer(self) -> None:
        self.file.write("one")
        self.file.write("two")
        self.assertEqual(self.path.read_text(), "")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.path.read_text(), "one\ntwo\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_full_buffer_is_written_at_once(self) -> None:
        line = "x" * 1023
        for _ in range(FLUSH_BYTES // 1024):
            self.file.write(line)
        self.assertEqual(self.path.stat().st_size, FLUSH_BYTES)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_writes_and_closes_later_lines_go_straight_through(self) -> None:
        self.file.write("before")
        self.file.stop()
        self.assertEqual(self.path.read_text(), "before\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.file.write("after")
        self.assertEqual(self.path.read_text(), "before\nafter\n")

    def test_reopen_follows_a_rotated_file(self) -> None:
        self.file.write("old")
        rotated = self.path.with_suffix(".1")
        os.rename(self.path, rotated)
        self.file.reopen()
        self.file.write("new")
        self.file.flush()
        self.assertEqual((rotated.read_text(), self.path.read_text()), ("old\n", "new\n"))

    def test_write_errors_drop_lines_and_are_logged_once(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        os.close(self.file._fd)
        self.file._fd = os.open(os.devnull, os.O_RDONLY)  # writes fail with EBADF
        self.file.write("lost")
        self.file.flush()
        self.file.write("lost too")
        self.file.flush()
        failed = [e for e in events if "not writable" in e.get("log_format", "")]
        self.assertEqual(len(failed), 1)
        self.assertNotIn("lost", repr(failed[0]))
        self.file.reopen()
        self.file.write("kept")
        self.file.flush()
        self.assertEqual(self.path.read_text(), "kept\n")
        self.assertTrue(any("writable again" in e.get("log_format", "") for e in events))


class SharingTests(SynchronousTestCase):
    def test_reloads_keep_the_file_and_a_new_path_opens_another(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="txgateway-access-"))
        self.addCleanup(shutil.rmtree, directory)
        clock = Clock()
        clock.advance(NOW)
        runtime = Runtime(clock, clock)
        self.addCleanup(runtime.stop)
        text = CONFIG + f"observability: {{access_log: {{path: '{directory / 'a.log'}'}}}}\n"
        first = access_log_for(parse_config(text), runtime)
        second = access_log_for(parse_config(text), runtime)
        other = access_log_for(parse_config(text.replace("a.log", "b.log")), runtime)
        assert first is not None and second is not None and other is not None
        self.assertIs(first.out, second.out)
        self.assertIsNot(first.out, other.out)
        harness = GatewayHarness(parse_config(text), MemoryUpstream(answer), clock=clock, runtime=runtime)
        self.assertIs(harness.access_log, first.out)  # what access_log_for opened, not a memory one
        harness.request("GET", "/api/users/1")
        self.assertEqual((directory / "a.log").read_text(), "")  # buffered
        runtime.stop()
        [record] = [json.loads(line) for line in (directory / "a.log").read_text().splitlines()]
        self.assertEqual((record["route"], record["status"]), ("users-api", 200))

    def test_output_key(self) -> None:
        config = parse_config("observability: {access_log: {path: /var/log/gw.log, format: combined}}\n")
        self.assertEqual(output_key(config), ("txgateway.access_log", "/var/log/gw.log", "combined"))


class NoSecretsTests(SynchronousTestCase):
    """Authorization, cookies, API keys and query tokens reach neither the access log nor the log."""

    def test_secrets_stay_out_of_every_log(self) -> None:
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        clock.advance(NOW)
        harness = GatewayHarness(parse_config(CONFIG), MemoryUpstream(answer), clock=clock)
        secrets = [API_KEY, TOKEN, "cookie-secret", "basic-secret"]
        harness.request("GET", f"/keyed/a?access_token={TOKEN}")
        harness.request("GET", "/keyed/a", headers=[("authorization", f"Bearer {TOKEN}")])
        harness.request("GET", "/keyed/a", headers=[("authorization", "Basic basic-secret")])
        harness.request("GET", "/keyed/a", headers=[("x-api-key", API_KEY), ("cookie", "sid=cookie-secret")])
        harness.request("GET", f"/api/users/1?apikey={API_KEY}&session=cookie-secret")
        harness.request("GET", "/keyed/a", headers=[("x-api-key", "wrong-" + API_KEY)])
        self.assertEqual(len(harness.access_log.lines), 6)
        logged = "\n".join(harness.access_log.lines) + "\n".join(repr(event) for event in events)
        for secret in secrets:
            self.assertNotIn(secret, logged)
        paths = [record["path"] for record in harness.access_log.records()]
        self.assertEqual(paths[4], "/api/users/1?apikey=REDACTED&session=REDACTED")
        self.assertEqual(paths[0], "/keyed/a")  # the auth stage consumed the query token
